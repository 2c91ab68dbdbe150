"""Small models shared by the tests (built without pretrained weights)."""
import torch
import torchvision
from torch import nn


class BertLikeLayer(nn.Module):
    """The module layout of a HuggingFace BERT layer, with plain nn.Linear projections."""

    def __init__(self, hidden=32, intermediate=64):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(hidden, hidden)
        self.attention.self.key = nn.Linear(hidden, hidden)
        self.attention.self.value = nn.Linear(hidden, hidden)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden)

    def forward(self, x):
        a = self.attention.self
        q, k, v = a.query(x), a.key(x), a.value(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(att))
        return self.output.LayerNorm(x + self.output.dense(torch.nn.functional.gelu(self.intermediate.dense(x))))


class BertLikeStack(nn.Module):
    def __init__(self, num_layers=2, hidden=32, intermediate=64, num_classes=5):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLikeLayer(hidden, intermediate) for _ in range(num_layers)])
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        for layer in self.encoder.layer:
            x = layer(x)
        return self.classifier(x[:, 0])


class ConvZoo(nn.Module):
    """Conv1d, grouped and depthwise Conv2d, Conv3d and MultiheadAttention with kdim/vdim."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.c3 = nn.Conv3d(2, 6, (2, 3, 3), padding=(0, 1, 1))
        self.attn = nn.MultiheadAttention(12, 3, kdim=6, vdim=6, batch_first=True)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        b = x.shape[0]
        seq = self.c1(x.reshape(b, 4, 16 * 4)[:, :, :16])          # (b, 8, 16)
        img = self.depthwise(self.grouped(seq.reshape(b, 8, 4, 4)))   # (b, 12, 4, 4)
        img = self.bn(img)
        vol = self.c3(x.reshape(b, 2, 2, 8, 8)[:, :, :, :4, :4])     # (b, 6, 1, 4, 4)
        kv = vol.reshape(b, 6, 16).transpose(1, 2)                   # (b, 16, 6)
        q = img.reshape(b, 12, 16).transpose(1, 2)                   # (b, 16, 12)
        out, _ = self.attn(q, kv, kv)
        return self.head(out.mean(1))


def small_vit(num_classes=10):
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    return model


def zoo():
    """(name, builder, input) for the equivalence tests."""
    return [
        ('resnet18', lambda: torchvision.models.resnet18(num_classes=10), lambda: torch.randn(2, 3, 32, 32)),
        ('mobilenet_v3_small', lambda: torchvision.models.mobilenet_v3_small(num_classes=10), lambda: torch.randn(2, 3, 32, 32)),
        ('vit', small_vit, lambda: torch.randn(2, 3, 32, 32)),
        ('bert_like', BertLikeStack, lambda: torch.randn(2, 6, 32)),
        ('conv_zoo', ConvZoo, lambda: torch.randn(2, 256)),
    ]
