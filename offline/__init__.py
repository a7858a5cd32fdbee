"""thinkahead batch side: catalog build, decoder training, think-ahead worker, evaluation.
Imports contracts from ``service``; never imported by it."""
