"""Training and evaluation of the embedded tiny text-to-image flow model (see README.md in this folder;
the package ships only the weights, solrl_core/models/tiny/weights)."""
