"""One path from a logged model to a prediction: the loader, the batched prediction and the served
pyfunc."""
