"""Evaluation metrics, usable without gin, Ray or MLflow.

frechet         Fréchet distance of feature sets (torchmetrics), FD extrapolated to infinitely many samples
sample_quality  class accuracy of samples, k-NN precision / recall
evaluator       the CNN evaluator of small image datasets and its fit
inception       Inception-v3 features from local weights (ImageNet scale)
probes          layer-wise linear / kNN probes of a backbone at noise levels
stratified      held-out flow loss per timestep bucket
plots           probe heatmap and loss-by-t pictures
"""
