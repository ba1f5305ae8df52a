"""Small, structurally faithful implementations of common CNN classifiers (no torchvision).

Each builder returns ``(model, target_layer, early_layer)``: the layer names a user would pick for
Grad-CAM (pytorch-grad-cam's usual targets) and an early feature layer. Widths are reduced (the
``width`` factor) so the zoo trains and exports in seconds; the structure is that of the original:
ResNet basic/bottleneck blocks, DenseNet dense blocks and transitions, EfficientNet MBConv with
squeeze-excitation and SiLU, MobileNetV3 inverted residuals with Hardswish/Hardsigmoid,
ConvNeXt blocks (depthwise 7x7, LayerNorm, GELU MLP, layer scale), VGG's Linear-ReLU-Dropout head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _c(v: float, divisor: int = 4) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


# --- ResNet --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout: conv7x7/2 → maxpool → layer1..4 → avgpool → flatten → fc."""

    def __init__(self, block, layers, num_classes, in_channels=1, width=1.0):
        super().__init__()
        planes = [_c(64 * width), _c(128 * width), _c(256 * width), _c(512 * width)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, planes[0], layers[0], 1)
        self.layer2 = self._layer(block, planes[1], layers[1], 2)
        self.layer3 = self._layer(block, planes[2], layers[2], 2)
        self.layer4 = self._layer(block, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)

    def _layer(self, block, planes, blocks, stride):
        layers = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes, in_channels=1, width=0.25):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width), "layer4", "layer1"


def resnet50(num_classes, in_channels=1, width=0.125):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width), "layer4", "layer1"


# --- DenseNet --------------------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1) if isinstance(features, (list, tuple)) else features
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, n, cin, growth, bn_size):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth, bn_size))

    def forward(self, x):
        features = [x]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """torchvision's DenseNet: features (…, norm5) → F.relu → adaptive_avg_pool2d → flatten → classifier."""

    def __init__(
        self, num_classes, in_channels=1, growth=32, block_config=(6, 12, 24, 16), init_features=64, bn_size=4
    ):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_channels, init_features, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        c = init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(c, c // 2))
                c //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def densenet121(num_classes, in_channels=1, width=0.25):
    model = DenseNet(num_classes, in_channels, growth=_c(32 * width), init_features=_c(64 * width))
    return model, "features", "features.denseblock1"


# --- EfficientNet-B0 --------------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    def __init__(self, cin, csq, activation=nn.SiLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(cin, csq, 1)
        self.fc2 = nn.Conv2d(csq, cin, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.SiLU):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, mid, 1))
        layers += [
            _conv_bn_act(mid, mid, k, stride, groups=mid),
            SqueezeExcitation(mid, max(1, cin // 4)),
            _conv_bn_act(mid, cout, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out  # stochastic depth is the identity in eval mode


class EfficientNet(nn.Module):
    """torchvision's EfficientNet-B0: features (stem, 7 MBConv stages, 1x1 conv-BN-SiLU) → avgpool →
    flatten → classifier (Dropout, Linear)."""

    # expand, kernel, stride, channels, repeats (B0)
    B0 = [
        (1, 3, 1, 16, 1),
        (6, 3, 2, 24, 2),
        (6, 5, 2, 40, 2),
        (6, 3, 2, 80, 3),
        (6, 5, 1, 112, 3),
        (6, 5, 2, 192, 4),
        (6, 3, 1, 320, 1),
    ]

    def __init__(self, num_classes, in_channels=1, width=1.0, depth=1.0):
        super().__init__()
        c = _c(32 * width, 8)
        layers = [_conv_bn_act(in_channels, c, 3, 2)]
        for expand, k, s, ch, n in self.B0:
            cout = _c(ch * width, 8)
            stage = []
            for i in range(max(1, round(n * depth))):
                stage.append(MBConv(c, cout, k, s if i == 0 else 1, expand))
                c = cout
            layers.append(nn.Sequential(*stage))
        last = 4 * c
        layers.append(_conv_bn_act(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(last, num_classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0(num_classes, in_channels=1, width=0.25):
    # target: the last BatchNorm (SiLU, pooling and the classifier follow); early inside `features`
    return EfficientNet(num_classes, in_channels, width), "features.8.1", "features.2"


# --- MobileNetV3-Small ----------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    def __init__(self, cin, k, mid, cout, use_se, act, stride):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers = []
        if mid != cin:
            layers.append(_conv_bn_act(cin, mid, 1, act=act))
        layers.append(_conv_bn_act(mid, mid, k, stride, groups=mid, act=act))
        if use_se:
            layers.append(SqueezeExcitation(mid, _c(mid // 4, 8), nn.ReLU, nn.Hardsigmoid))
        layers.append(_conv_bn_act(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res else out


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3-Small: features → avgpool → flatten → classifier (Linear, Hardswish,
    Dropout, Linear)."""

    SMALL = [
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ]

    def __init__(self, num_classes, in_channels=1, width=1.0, last_channel=1024):
        super().__init__()
        w = lambda v: _c(v * width, 8)  # noqa: E731
        layers = [_conv_bn_act(in_channels, w(16), 3, 2, act=nn.Hardswish)]
        for cin, k, mid, cout, se, a, s in self.SMALL:
            layers.append(InvertedResidual(w(cin), k, w(mid), w(cout), se, nn.Hardswish if a == "HS" else nn.ReLU, s))
        last_conv = 6 * w(96)
        layers.append(_conv_bn_act(w(96), last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = _c(last_channel * width, 8)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, hidden),
            nn.Hardswish(inplace=True),
            nn.Dropout(0.2, inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v3_small(num_classes, in_channels=1, width=0.5):
    return MobileNetV3(num_classes, in_channels, width), "features", "features.1"


# --- ConvNeXt -----------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's ConvNeXt LayerNorm2d)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    """ConvNeXt-T layout: patchify stem, 4 stages (3, 3, 9, 3 blocks) with LayerNorm2d + 2x2/2
    downsampling, then avgpool → classifier (LayerNorm2d, Flatten, Linear)."""

    def __init__(self, num_classes, in_channels=1, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim, layer_scale=0.1) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(num_classes, in_channels=1, width=0.125):
    dims = tuple(_c(d * width, 8) for d in (96, 192, 384, 768))
    return ConvNeXt(num_classes, in_channels, dims), "features", "features.1"


# --- VGG ----------------------------------------------------------------------------------------
class VGG(nn.Module):
    """torchvision's VGG-11-BN: features (conv-BN-ReLU, max pools) → AdaptiveAvgPool2d(7) → flatten →
    classifier (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear)."""

    CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, num_classes, in_channels=1, width=1.0, hidden=4096):
        super().__init__()
        layers, c = [], in_channels
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                v = _c(v * width, 8)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        h = _c(hidden * width, 8)
        self.classifier = nn.Sequential(
            nn.Linear(c * 49, h),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(h, h),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(h, num_classes),
        )

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg11_bn(num_classes, in_channels=1, width=0.125):
    # target: the last ReLU of `features` (before the last max pool), as pytorch-grad-cam users pick
    model = VGG(num_classes, in_channels, width)
    return model, f"features.{len(model.features) - 2}", "features.2"


ZOO = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "efficientnet_b0": efficientnet_b0,
    "mobilenet_v3_small": mobilenet_v3_small,
    "convnext_tiny": convnext_tiny,
    "vgg11_bn": vgg11_bn,
}
