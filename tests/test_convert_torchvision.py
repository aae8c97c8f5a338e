"""tools/convert_torchvision_to_d2.py: torchvision ResNet weights load into detectron2's ResNet exactly."""
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import build_resnet_backbone
from tool_scripts import load_tool

import d2norm

REPO = Path(__file__).resolve().parents[1]


def test_every_torchvision_tensor_lands_in_the_matching_detectron2_tensor(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    source = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, source)
    output = tmp_path / "r18.pkl"
    subprocess.run([sys.executable, str(REPO / "tools" / "convert_torchvision_to_d2.py"), str(source), str(output)],
                   check=True, capture_output=True)

    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_list(["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                         "MODEL.RESNETS.NORM", "CBN", "MODEL.RESNETS.STRIDE_IN_1X1", "False",
                         "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.OUT_FEATURES", "['res5']"])
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    DetectionCheckpointer(backbone).load(str(output))
    ours = backbone.state_dict()
    for name, value in tv.state_dict().items():
        new = load_tool("convert_torchvision_to_d2").convert_name(name)
        if new is not None:
            assert torch.equal(ours[new], value), name
    tv.eval(), backbone.eval()
    x = torch.randn(1, 3, 64, 64)
    features = torch.nn.Sequential(*list(tv.children())[:-2])(x)
    torch.testing.assert_close(backbone(x)["res5"], features)


def test_mabn_style_names_and_buffers_are_converted():
    convert = load_tool("convert_torchvision_to_d2")
    state = {
        "module.layer1.0.bn2.running_var": torch.ones(1, 8, 1, 1),
        "module.layer1.0.bn2.iters": torch.tensor(5),
        "module.layer1.0.bn2.buffer_x2": torch.zeros(16, 8),
        "module.layer4.2.downsample.1.weight": torch.ones(8),
        "module.fc.weight": torch.ones(2, 8),
    }
    out = convert.convert_state_dict(state)
    assert set(out) == {"res2.0.conv2.norm.running_var", "res5.2.shortcut.norm.weight"}
    assert out["res2.0.conv2.norm.running_var"].shape == (8,)
