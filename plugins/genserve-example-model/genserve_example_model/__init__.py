"""An example genserve model plugin: GPT-J on genserve's layers."""
