import numpy as np
import onnxruntime as ort
import pytest
import torch

from imgsim import backbones, featurize_images, sync_image_folder
from imgsim.featurize import backbone_graph, feature_key


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_exported_graph_normalises_pixels_and_matches_the_torch_module(name):
    spec = backbones.get_spec(name)
    module = backbones.build_module(name)
    graph = backbones.export_onnx(name)
    size = backbones.INPUT_SIZE
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
    normalised = (pixels.astype(np.float32) - np.float32(spec.mean)) / np.float32(spec.std)
    with torch.no_grad():
        want = module(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": pixels})[0]
    assert got.shape == (3, spec.dim)
    assert np.allclose(got, want, atol=1e-4)


def test_packaged_weights_give_confident_imagenet_predictions():
    """The ImageNet head on our backbone definition is confident on a plain pattern:
    the weights really loaded into the right layers (random weights would not)."""
    module = backbones.build_module("mobilenet_v2")
    state = torch.load(backbones.weights_path("mobilenet_v2"), weights_only=True)
    x = torch.zeros(1, 3, 224, 224)
    x[:, :, :, ::16] = 2.0  # vertical stripes
    with torch.no_grad():
        logits = module(x) @ state["classifier.1.weight"].T + state["classifier.1.bias"]
    assert torch.softmax(logits, 1).max() > 0.2


def test_resnet18_takes_a_torchvision_format_file(tmp_path, empty_store, texture_folder):
    module = backbones._architectures()["resnet18"]()
    state = module.state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    sync_image_folder(empty_store, texture_folder, progress=False)
    counts = featurize_images(empty_store, "resnet18", weights=path, progress=False)
    assert counts["featurized"] > 100
    _, _, matrix = empty_store.feature_matrix(feature_key("resnet18", path))
    assert matrix.shape[1] == 512


def test_a_file_of_the_wrong_backbone_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="is not a resnet18 state_dict"):
        backbones.build_module("resnet18", backbones.weights_path("mobilenet_v2"))


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="efficientnet_lite0, mobilenet_v2, resnet18"):
        backbones.get_spec("vgg16")


def test_stored_graph_is_reused_without_torch_export(empty_store, monkeypatch, tmp_path):
    key, graph = backbone_graph(empty_store, "efficientnet_lite0")
    assert empty_store.load_model(key)[1]["dim"] == 1280
    monkeypatch.setenv("IMGSIM_CACHE", str(tmp_path / "no-cache"))
    monkeypatch.setattr(backbones, "export_onnx", lambda *a: pytest.fail("exported again"))
    assert backbone_graph(empty_store, "efficientnet_lite0") == (key, graph)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2", "resnet18"])
def test_the_exported_trunk_feeds_the_top_stages_that_fine_tuning_trains(name):
    """Fine-tuning trains ``top`` on the exported trunk's outputs, then exports the whole:
    the two halves must compose to the whole graph, and ``top_modules`` must hold every
    parameter the top uses (and none of the trunk's)."""
    module = backbones._architectures()[name]().eval()
    size = backbones.INPUT_SIZE
    pixels = np.random.default_rng(1).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)

    def run(graph):
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        return session.run(None, {"image": pixels})[0]

    trunk = run(backbones.module_to_onnx(module, name, part="trunk"))
    with torch.no_grad():
        composed = module.top(torch.from_numpy(trunk)).numpy()
    assert np.allclose(composed, run(backbones.module_to_onnx(module, name)), atol=1e-4)
    top = {id(p) for m in module.top_modules() for p in m.parameters()}
    module.top(torch.from_numpy(trunk)).sum().backward()
    used = {id(p) for p in module.parameters() if p.grad is not None}
    assert used == top


def test_a_weights_file_over_the_limit_or_not_regular_is_refused(tmp_path):
    import os

    from imgsim.backbones import MAX_WEIGHTS_BYTES, file_sha256, weights_path

    big = tmp_path / "big.pth"
    with open(big, "wb") as fh:  # sparse: nothing is written
        fh.truncate(MAX_WEIGHTS_BYTES + 1)
    with pytest.raises(ValueError, match="larger than the limit"):
        weights_path("resnet18", big)
    os.mkfifo(tmp_path / "pipe.pth")
    with pytest.raises(FileNotFoundError):
        weights_path("resnet18", tmp_path / "pipe.pth")
    with pytest.raises(ValueError, match="not a regular file"):
        file_sha256(tmp_path / "pipe.pth")  # opened without waiting for a writer
