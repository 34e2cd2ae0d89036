"""genserve's AWS Neuron backend (Inferentia2, Trainium) through torch-neuronx's XLA device.

Importing this package is cheap and safe on any machine: torch_neuronx and torch_xla are
imported only once the backend is chosen. The bucketing and padding logic is plain Python and
PyTorch and is tested on CPU.
"""

__version__ = "0.1.0"
