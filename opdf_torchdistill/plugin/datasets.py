"""torchdistill dataset/model registrations for the embedded digits data."""
import torchvision.datasets  # noqa: F401  (torchdistill's dataset registry reads it at import)
from torchdistill.datasets.registry import register_dataset
from torchdistill.models.registry import register_model

from ..data import Digits
from ..zoo import digits_cnn

register_dataset(Digits)  # key 'Digits'; YAML can also use !import_call key: 'opdf_torchdistill.data.Digits'
register_model(digits_cnn)  # key 'digits_cnn'

__all__ = ['Digits', 'digits_cnn']
