"""Downstream fine-tuning of a pretrained S-SMKE checkpoint: ImageNet-1K and CIFAR (full and linear), the nine GLUE
tasks, COCO and Flickr30K retrieval. ``runner`` is the recipe, ``config`` the schema, ``source`` what a task takes
from the pretrained checkpoint, ``vision``/``glue``/``retrieval`` the task families, ``sweep`` the per-family sweeps.
"""
