"""torchdistill dataset/model registrations for the embedded studies (digits, Fashion-MNIST)."""
import torchvision.datasets  # noqa: F401  (torchdistill's dataset registry reads it at import)
from torchdistill.datasets.registry import register_dataset
from torchdistill.models.registry import register_model

from ..data import Digits, FashionMNIST
from ..zoo import digits_cnn, fashion_cnn, fashion_vit, fashion_vit_from_teacher

# Keys 'Digits' and 'OPDFFashionMNIST' (torchdistill already registers torchvision's 'FashionMNIST'; it
# stays torchvision's). Recipes build them with !import_call key: 'opdf_torchdistill.data.FashionMNIST'.
register_dataset(Digits)
register_dataset(FashionMNIST, key='OPDFFashionMNIST')
for _model in (digits_cnn, fashion_cnn, fashion_vit, fashion_vit_from_teacher):
    register_model(_model)  # key = function name

__all__ = ['Digits', 'FashionMNIST', 'digits_cnn', 'fashion_cnn', 'fashion_vit', 'fashion_vit_from_teacher']
