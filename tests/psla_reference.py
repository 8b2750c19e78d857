"""PSLA's model, as psla ``src/models/Models.py`` defines it (EffNetAttention and its three pooling
heads), for the import parity test. Written from memory, then checked line by line against psla's
``src/models/Models.py`` and ``src/models/HigherModels.py`` (YuanGongND/psla @ ad3ea6f): the same
layers, names, activations, clamp and head weights (EffNetAttention always builds 4 heads when
head_num > 1). cmkd's own implementation is ``cmkd/models/backbones/psla.py``, written separately."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet
from torch import nn


class Attention(nn.Module):
    def __init__(self, n_in, n_out, att_activation, cla_activation):
        super().__init__()
        self.att_activation, self.cla_activation = att_activation, cla_activation
        self.att = nn.Conv2d(n_in, n_out, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=True)
        self.cla = nn.Conv2d(n_in, n_out, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=True)

    def activate(self, x, activation):
        if activation == "linear":
            return x
        if activation == "relu":
            return F.relu(x)
        if activation == "sigmoid":
            return torch.sigmoid(x)
        if activation == "softmax":
            return F.softmax(x, dim=1)

    def forward(self, x):
        att = self.activate(self.att(x), self.att_activation)
        cla = self.activate(self.cla(x), self.cla_activation)
        att, cla = att[:, :, :, 0], cla[:, :, :, 0]
        epsilon = 1e-7
        att = torch.clamp(att, epsilon, 1.0 - epsilon)
        norm_att = att / torch.sum(att, dim=2)[:, :, None]
        return torch.sum(norm_att * cla, dim=2), norm_att


class MeanPooling(nn.Module):
    def __init__(self, n_in, n_out, att_activation, cla_activation):
        super().__init__()
        self.cla_activation = cla_activation
        self.cla = nn.Conv2d(n_in, n_out, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=True)

    def forward(self, x):
        cla = torch.sigmoid(self.cla(x))[:, :, :, 0]
        return torch.mean(cla, dim=2), []


class MHeadAttention(nn.Module):
    def __init__(self, n_in, n_out, att_activation, cla_activation, head_num=4):
        super().__init__()
        self.head_num = head_num
        self.att_activation, self.cla_activation = att_activation, cla_activation
        self.att, self.cla = nn.ModuleList([]), nn.ModuleList([])
        for _ in range(self.head_num):
            self.att.append(nn.Conv2d(n_in, n_out, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=True))
            self.cla.append(nn.Conv2d(n_in, n_out, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), bias=True))
        self.head_weight = nn.Parameter(torch.tensor([1.0 / self.head_num] * self.head_num))

    def forward(self, x):
        x_out = []
        for i in range(self.head_num):
            att = torch.sigmoid(self.att[i](x))[:, :, :, 0]
            cla = torch.sigmoid(self.cla[i](x))[:, :, :, 0]
            att = torch.clamp(att, 1e-7, 1.0 - 1e-7)
            norm_att = att / torch.sum(att, dim=2)[:, :, None]
            x_out.append(torch.sum(norm_att * cla, dim=2) * self.head_weight[i])
        return (torch.stack(x_out, dim=0)).sum(dim=0), []


class EffNetAttention(nn.Module):
    def __init__(self, label_dim=527, b=0, pretrain=False, head_num=4):
        super().__init__()
        self.middim = [1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560]
        self.effnet = EfficientNet.from_name("efficientnet-b" + str(b), in_channels=1)  # pretrain=False path
        if head_num > 1:
            self.attention = MHeadAttention(self.middim[b], label_dim, att_activation="sigmoid",
                                            cla_activation="sigmoid")
        elif head_num == 1:
            self.attention = Attention(self.middim[b], label_dim, att_activation="sigmoid", cla_activation="sigmoid")
        else:
            self.attention = MeanPooling(self.middim[b], label_dim, att_activation="sigmoid",
                                         cla_activation="sigmoid")
        self.avgpool = nn.AvgPool2d((4, 1))
        self.effnet._fc = nn.Identity()

    def forward(self, x, nframes=1056):
        # expect input [batch_size, time_frame_num, frequency_bins], e.g., [12, 1056, 128]
        x = x.unsqueeze(1)
        x = x.transpose(2, 3)
        x = self.effnet.extract_features(x)
        x = self.avgpool(x)
        x = x.transpose(2, 3)
        out, norm_att = self.attention(x)
        return out
