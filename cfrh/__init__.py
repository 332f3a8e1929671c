"""cfrh: CLIP-based Fusion-modal Reconstructing Hashing for unsupervised cross-modal retrieval.

Two stages around a feature cache: ``extract`` writes CLIP image embeddings and tag
bag-of-words into Zarr once; ``train`` learns k-bit codes for both modalities from the
cache; ``evaluate`` scores them; an index over packed codes serves search.
"""
from .cache import FeatureCache, default_cache_root
from .codes import hamming_distances, pack_codes, unpack_codes
from .config import Pipeline, load_pipeline
from .errors import CfrhError

__version__ = "0.1.0"
__all__ = ["FeatureCache", "default_cache_root", "hamming_distances", "pack_codes", "unpack_codes",
           "Pipeline", "load_pipeline", "CfrhError", "__version__"]
