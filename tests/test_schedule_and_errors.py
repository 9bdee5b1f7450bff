"""The layer schedule and bad-input errors: every ValueError names the parameter at fault."""

from __future__ import annotations

import pytest
import torch

from conftest import image_batch, prompt_batch
from visor_lightning.models import LayerSchedule, ScheduleConfig


def test_default_schedule_is_uniform_with_a_third_each():
    s = LayerSchedule.build(24)
    assert s.ca_layers == tuple(range(1, 24, 3)) and s.sa_layers == tuple(range(0, 24, 3))
    assert s.always_on_sa == (0,) and s.router_layer == 3
    assert len(s.feasible) == 8 and s.names[0] == "sa[0]" and s.names[-1] == "sa[0,3,6,9,12,15,18,21]"
    assert all(len(c) == k + 1 for k, c in enumerate(s.feasible))
    assert s.index("sa[0]") == 0 and s.index([0, 3, 6, 9, 12, 15, 18, 21]) == 7 == s.full_config
    mask = s.active_mask(torch.tensor([0, 7]))
    assert mask[0].nonzero().flatten().tolist() == [0] and mask[1].sum() == 8


def test_schedule_all_subsets_and_explicit():
    s = LayerSchedule.build(12, ScheduleConfig(num_ca=4, num_sa=3, feasible="all"))
    assert len(s.feasible) == 4 and len(s.optional_sa) == 2
    e = LayerSchedule.build(6, ScheduleConfig(ca_layers=[2, 5], sa_layers=[1, 4], always_on_sa=[], feasible=[[], [4], [1, 4]]))
    assert e.describe() == ".sC.sC" and e.router_layer == 1


@pytest.mark.parametrize(
    "cfg, match",
    [
        (ScheduleConfig(ca_layers=[1, 30]), "schedule.ca_layers"),
        (ScheduleConfig(sa_layers=[-1]), "schedule.sa_layers"),
        (ScheduleConfig(ca_layers=[1, 4], sa_layers=[1, 3]), "overlap"),
        (ScheduleConfig(ca_layers=[1, 1]), "duplicate"),
        (ScheduleConfig(sa_layers=[0, 3], always_on_sa=[2]), "always_on_sa"),
        (ScheduleConfig(feasible=[[0, 5]]), "schedule.feasible"),
        (ScheduleConfig(feasible=[]), "schedule.feasible"),
        (ScheduleConfig(feasible="some"), "schedule.feasible"),
        (ScheduleConfig(num_ca=9), "schedule.num_ca"),
    ],
)
def test_bad_schedule_is_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        LayerSchedule.build(12, cfg)


def test_unknown_configuration_name():
    with pytest.raises(ValueError, match="not feasible"):
        LayerSchedule.build(12).index("sa[1]")


def test_bad_images_and_text(visor_model):
    pixels, image_sizes, n_vis = image_batch(visor_model, [(32, 32)])
    ids, mask, _ = prompt_batch(visor_model, n_vis, [2], [3])
    with pytest.raises(ValueError, match="pixel_values.*channels"):
        visor_model(ids, pixels[:, :, :1], image_sizes)
    with pytest.raises(ValueError, match="pixel_values crops are 48x48"):
        visor_model(ids, torch.randn(1, 3, 3, 48, 48), image_sizes)
    with pytest.raises(ValueError, match="pixel_values must be 4-D or 5-D"):
        visor_model(ids, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="image_sizes is required"):
        visor_model(ids, pixels)
    with pytest.raises(ValueError, match="input_ids must be a non-empty"):
        visor_model(torch.zeros(1, 0, dtype=torch.long), pixels, image_sizes)
    only_image = torch.full((1, n_vis[0]), visor_model.image_token_id)
    with pytest.raises(ValueError, match="input_ids: every sample needs at least one text token"):
        visor_model(only_image, pixels, image_sizes)
    with pytest.raises(ValueError, match="input_ids row 0 has"):
        visor_model(ids[:, 1:] if ids[0, 0] == visor_model.image_token_id else ids[:, :-4], pixels, image_sizes)
    with pytest.raises(ValueError, match="pixel_values is None"):
        visor_model(ids)
    with pytest.raises(ValueError, match="config_ids"):
        visor_model(ids, pixels, image_sizes, config_ids=torch.tensor([9]))
    right_padded = torch.cat([ids, torch.zeros_like(ids[:, :2])], 1)
    with pytest.raises(ValueError, match="left-padded"):
        visor_model.generate(right_padded, pixels, image_sizes, torch.cat([mask, torch.zeros_like(mask[:, :2])], 1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        visor_model.generate(ids, pixels, image_sizes, max_new_tokens=0)


def test_schedule_must_fit_the_host(spec):
    from conftest import make_host
    from visor_lightning.models import VisorModel

    with pytest.raises(ValueError, match="schedule has 12 layers"):
        VisorModel(spec, LayerSchedule.build(12), host=make_host(spec))
