"""RecoverConfig by concern: flat names, the nested form and group objects are one config; records use flat names."""

from __future__ import annotations

import dataclasses

import pytest

from trimformer import cli
from trimformer.commands.recover import config_from_args
from trimformer.config import ConfigError, field_types
from trimformer.methods import Recipe
from trimformer.recover import DistillConfig, LoRAConfig, RecoverConfig, Schedule
from trimformer.recover.config import ALIASES, Lasso


def test_flat_nested_dotted_and_group_objects_are_one_config():
    flat = RecoverConfig(lora_rank=8, lr=1e-3, group_lasso_parts="ffn", checkpoint_dir="ck")
    nested = RecoverConfig(lora={"rank": 8}, schedule={"lr": 1e-3}, lasso={"parts": ["ffn"]}, checkpoint={"dir": "ck"})
    dotted = RecoverConfig(**{"lora.rank": "8", "schedule.lr": "1e-3", "lasso.parts": "ffn", "checkpoint.dir": "ck"})
    objects = RecoverConfig(lora=LoRAConfig(rank=8), schedule=Schedule(lr=1e-3), lasso=Lasso(parts=["ffn"]),
                            checkpoint={"dir": "ck"})
    assert flat == nested == dotted == objects
    assert flat.lora.rank == 8 and flat.schedule.lr == 1e-3 and flat.lasso.parts == ["ffn"]
    assert flat.schedule.steps == 300 and flat.lasso.strength == 0.0  # the rest of each group: its defaults
    # a group given whole, then a flat name on top of it; the object given is not changed
    base = Schedule(steps=7)
    assert RecoverConfig(schedule=base, lr=0.5).schedule == Schedule(steps=7, lr=0.5) and base.lr is None
    # a partial group takes the rest from its owner's default, not from the group class
    assert DistillConfig(lr=1e-3).schedule == Schedule(steps=200, batch_size=16, lr=1e-3)
    assert DistillConfig(schedule={"lr": 1e-3}) == DistillConfig(lr=1e-3) and DistillConfig(schedule={}) == DistillConfig()
    assert dataclasses.replace(flat, checkpoint_dir="other").checkpoint.dir == "other"


def test_alias_table_names_every_setting_once_and_records_round_trip():
    paths = set()
    for name, annotation in field_types(RecoverConfig).items():
        if dataclasses.is_dataclass(annotation):
            paths |= {f"{name}.{sub}" for sub in field_types(annotation)}
        else:
            paths.add(name)
    assert sorted(ALIASES.values()) == sorted(paths)  # every setting has exactly one flat name
    cfg = RecoverConfig(steps=5, lora_rank=4, loss="kl+hidden", hidden_map="0,1", release_memory=False, seed=3)
    record = cfg.settings()
    assert list(record) == list(ALIASES)  # the record: flat names, in the table's order
    assert record["hidden_map"] == [0, 1] and record["lora_rank"] == 4 and record["release_memory"] is False
    assert RecoverConfig(**record) == cfg


def test_bad_settings_name_what_the_user_typed():
    with pytest.raises(ConfigError, match="no setting 'temprature'. Did you mean 'temperature'"):
        RecoverConfig(temprature=2)
    with pytest.raises(ConfigError, match="Did you mean 'lora.rank'"):
        RecoverConfig(**{"lora.rnk": 4})
    with pytest.raises(ConfigError, match=r"group_lasso_parts\[1\]='neurons': choose one of 'ffn', 'heads'"):
        RecoverConfig(group_lasso_parts="ffn,neurons")
    with pytest.raises(ConfigError, match="lora_rank='eight': expected an integer"):
        RecoverConfig(lora_rank="eight")
    for settings, message in [({"lora_rank": -1}, "lora_rank"), ({"gmp_every": 0}, "gmp_every"),
                              ({"keep_checkpoints": 0}, "keep_checkpoints"), ({"loss_chunk": -1}, "loss_chunk"),
                              ({"freeze_fraction": 0.5, "lora_rank": 4}, "freeze_fraction"),
                              ({"max_grad_norm": -1}, "max_grad_norm")]:
        with pytest.raises(ValueError, match=message):
            RecoverConfig(**settings)


def test_recipes_take_the_nested_form_and_record_flat_names():
    nested = Recipe.from_obj([{"method": "recover", "teacher": "dense", "lora": {"rank": 4}, "schedule": {"steps": 2}}])
    flat = Recipe.from_obj([{"method": "recover", "teacher": "dense", "lora_rank": 4, "steps": 2}])
    assert nested.build() == flat.build()
    step = flat.override({"lora.rank": 2, "temperature": 3}).build()[0]  # --set, flat or dotted
    assert step.lora.rank == 2 and step.objective.temperature == 3.0
    with pytest.raises(ValueError, match="no step of the recipe"):
        flat.override({"lora.rnk": 2})
    written = flat.to_list()[0]  # what trimformer.json records
    assert written["lora_rank"] == 4 and written["teacher"] == "dense" and "lora" not in written
    assert Recipe.from_obj([written]).build() == flat.build()


def test_cli_flags_and_set_map_onto_the_groups(tmp_path):
    args = cli.parser().parse_args(["recover", "pruned", "--teacher", "dense", "--out", str(tmp_path / "o"),
                                    "--steps", "7", "--lora-rank", "4", "--max-minutes", "2", "--set", "hidden_map=0,1",
                                    "--set", "gmp.every=3", "--set", "lora_alpha=16"])
    cfg = config_from_args(args)
    assert cfg.schedule.steps == 7 and cfg.schedule.max_minutes == 2.0 and cfg.lora == LoRAConfig(rank=4, alpha=16.0)
    assert cfg.objective.hidden_map == [0, 1] and cfg.gmp.every == 3
    assert cfg.checkpoint.dir == f"{tmp_path / 'o'}.checkpoints"
