"""Cards: the YAML declarations the suite reads — datasets (``datasets/<id>.yaml``), pretraining
corpora (``datasets/corpora/<id>.yaml``) and models (``models/<id>/model.yaml``)."""
