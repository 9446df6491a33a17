"""File access: lazy tensor stores (safetensors, ``.bin``, shards), row reads straight
from disk, the Hugging Face cache and atomic writes. Imports only :mod:`wdanalysis.errors`."""
