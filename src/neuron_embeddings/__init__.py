"""Neuron embeddings: what each MLP neuron responds to, and how polysemantic it is.

The stages, one module each, data flowing one way:
corpus -> activations -> selection -> embeddings -> clustering -> metrics -> report.
Every stage is a plain function over arrays and tables; the Snakemake workflow only wires them together.
"""

__version__ = "0.1.0"
