"""Label-free recalibration on a target domain ("Rethinking 'Batch' in BatchNorm", Sec. 5.1):
``d2norm.recalibrate(..., labels=False)`` and ``tools/recalibrate.py``."""
import pytest
import torch
import torch.nn as nn
from test_train_net import DEMO_BASE, tiny_opts
from tool_scripts import load_tool

from d2norm import CrossIterationBatchNorm2d, recalibrate
from d2norm.data import SHIFTED, generate_shapes_split
from d2norm.modeling.binding import prepare_model

recalibrate_tool = load_tool("recalibrate")


def _source_trained_block():
    """conv -> BN -> ReLU -> conv -> CBN, with population statistics of a source domain N(0, 1)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 1, bias=False), CrossIterationBatchNorm2d(5, window=2))
    block = prepare_model(block, example_inputs=(torch.zeros(1, 3, 6, 6),))
    with torch.no_grad():
        block[1].weight.uniform_(0.5, 2.0)
        block[1].bias.uniform_(-1.0, 1.0)
    source = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    recalibrate(block, source, len(source))
    return block.eval()


def test_without_labels_the_target_domain_gets_its_own_population_statistics():
    """After recalibrating on unlabeled target images, the eval-mode BN output on those images has
    exactly the mean β (the population mean is the pooled mean of the target inputs); before, the
    source statistics leave it far off. Parameters and train/eval modes do not change."""
    block = _source_trained_block()
    target = [0.3 * torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(100 + s)) + 2.0
              for s in range(8)]  # another camera: lower contrast, brighter

    def bn_output_mean():
        with torch.no_grad():
            return torch.cat([block[1](block[0](x)) for x in target]).mean(dim=(0, 2, 3))

    beta = block[1].bias.detach().clone()
    params = {k: v.clone() for k, v in block.named_parameters()}
    assert (bn_output_mean() - beta).abs().max() > 0.3
    recalibrate(block, iter(target), len(target), labels=False)
    torch.testing.assert_close(bn_output_mean(), beta, rtol=0, atol=1e-5)
    assert not block.training and not any(m.training for m in block.modules())
    assert all(torch.equal(v, params[k]) for k, v in block.named_parameters())


@pytest.fixture(scope="module")
def shifted_images(tmp_path_factory):
    """A folder of 4 unlabeled images of the shifted domain."""
    split = generate_shapes_split(tmp_path_factory.mktemp("shifted"), 4, seed=3, image_size=96, style=SHIFTED)
    return split.image_root


def _tool_args(tmp_path, norm, images, *extra):
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config, build_model

    opts = [*tiny_opts(norm, tmp_path, ("d2norm_shapes_train", "d2norm_shapes_val")), "MODEL.DEVICE", "cpu"]
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(str(DEMO_BASE))
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "source.pth")
    return recalibrate_tool.parse_args(["--config-file", str(DEMO_BASE), "--weights", str(tmp_path / "source.pth"),
                                        "--images", str(images), "--output", str(tmp_path / "target.pth"),
                                        *extra, *opts])


def test_the_tool_writes_a_checkpoint_with_new_statistics_and_the_same_parameters(tmp_path, shifted_images):
    args = _tool_args(tmp_path, "CBN", shifted_images, "--batch-size", "2")
    recalibrate_tool.main(args)
    before = torch.load(tmp_path / "source.pth")["model"]
    after = torch.load(tmp_path / "target.pth")
    assert after["recalibration_images"] == 4 and after["recalibrated_on"] == str(shifted_images)
    after = after["model"]
    assert set(after) == set(before)
    statistics = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(before[k], after[k]) for k in statistics)
    assert all(torch.equal(before[k], after[k]) for k in before
               if k.endswith(("weight", "bias")) and "norm" not in k)
    assert not (tmp_path / "target.pth.tmp").exists()


def test_the_tool_names_what_is_wrong(tmp_path, shifted_images):
    with pytest.raises(SystemExit, match="nothing to recalibrate; its norm layers: none"):
        recalibrate_tool.main(_tool_args(tmp_path, "", shifted_images))  # no norm anywhere
    with pytest.raises(SystemExit, match="neither a folder of images nor a registered dataset; registered "
                                         "datasets: .*d2norm_shapes_shifted_val"):
        recalibrate_tool.main(_tool_args(tmp_path, "CBN", tmp_path / "no-such-folder"))
    with pytest.raises(SystemExit, match="--num-iter 5 x --batch-size 2 needs 10 images; .* has 4"):
        recalibrate_tool.main(_tool_args(tmp_path, "CBN", shifted_images, "--num-iter", "5"))
