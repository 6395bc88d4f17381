"""Example factories for specs/custom_stripes.yaml: a model and a dataset of your own."""
