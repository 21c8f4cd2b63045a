"""What a pull request is checked with: a model folder (``validate``), submitted results
(``submission``) and the committed reference scores (``reference``)."""
