"""Tables 1-2 and Figs. 3a-c: protocols, metrics, transferability, results folders,
plots."""
