"""Feature networks for sample-quality metrics that ship inside the package (no download, fast on a CPU).

``diffexp.quality.features.digits``: a small CNN trained on scikit-learn's digits; its penultimate layer
gives the features of ``eval/fd_digits_<n>`` and friends, its logits the class statistics. Metrics
on these features carry the network's name, never ``fid``, which means Inception.
"""
