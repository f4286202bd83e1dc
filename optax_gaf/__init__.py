"""optax_gaf: Gradient Agreement Filtering (arXiv 2412.18052) for Optax."""

from optax_gaf._src.accumulation import GafAccumulateState as GafAccumulateState
from optax_gaf._src.accumulation import gaf_accumulate as gaf_accumulate
from optax_gaf._src.accumulation import has_updated as has_updated
from optax_gaf._src.agreement import Agreement as Agreement
from optax_gaf._src.agreement import agreement_weights as agreement_weights
from optax_gaf._src.collective import cross_device_gram as cross_device_gram
from optax_gaf._src.gram import gram_matrix as gram_matrix
from optax_gaf._src.microbatch import microbatch_grads as microbatch_grads
from optax_gaf._src.scan import apply_if_agreed as apply_if_agreed
from optax_gaf._src.scan import gaf_value_and_grad as gaf_value_and_grad
from optax_gaf._src.transform import GafState as GafState
from optax_gaf._src.transform import gaf as gaf
from optax_gaf._src.wrapper import WithGafState as WithGafState
from optax_gaf._src.wrapper import with_gaf as with_gaf

__version__ = "0.1.0"

__all__ = (
    "Agreement",
    "GafAccumulateState",
    "GafState",
    "WithGafState",
    "agreement_weights",
    "apply_if_agreed",
    "cross_device_gram",
    "gaf",
    "gaf_accumulate",
    "gaf_value_and_grad",
    "gram_matrix",
    "has_updated",
    "microbatch_grads",
    "with_gaf",
)
