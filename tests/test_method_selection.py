"""Choosing methods (ids, all, family:<name>), listing them, the family and own fields of
records, tables grouped by family, and plots that stay readable with many methods."""

from __future__ import annotations

import numpy as np
import pytest

import gradosr.methods  # noqa: F401  (registers the presets)
from gradosr.cli import main
from gradosr.detectors.registry import METHODS, describe, family_order, method_ids, select_methods
from gradosr.errors import ConfigError
from gradosr.evaluation.plots import TOP_OTHERS, curve_style, shown_methods
from gradosr.evaluation.scoring import SplitScores
from gradosr.evaluation.tables import markdown_table


def test_select_methods_by_id_all_and_family():
    listed = method_ids("preset") + method_ids("baseline")
    assert select_methods(["all"]) == listed
    gradient = select_methods(["family:gradient"])
    assert gradient == [m for m in listed if METHODS[m].family == "gradient"]
    assert {"paper", "plus", "gradnorm", "gradunc"} <= set(gradient)
    assert select_methods(["msp", "family:logit"])[0] == "msp"  # no repeats, order kept
    assert len(set(select_methods(["msp", "family:logit"]))) == len(select_methods(["msp", "family:logit"]))
    with pytest.raises(ConfigError, match="no method of family"):
        select_methods(["family:nope"])
    with pytest.raises(ConfigError, match="unknown method"):
        select_methods(["nope"])


def test_describe_and_family_order():
    assert describe("plus") == ("gradient", True) and describe("paper-n2") == ("gradient", True)
    assert describe("msp") == ("logit", False) and describe("knn") == ("feature", False)
    ordered = family_order(["msp", "knn", "plus", "gradnorm"])
    assert ordered == ["plus", "gradnorm", "knn", "msp"]


def test_list_methods_prints_every_method(capsys):
    assert main(["benchmark", "--list-methods"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()[1:]
    assert sorted(line.split()[0] for line in lines) == sorted(method_ids("preset") + method_ids("baseline"))
    row = next(line for line in lines if line.startswith("energy "))
    assert "logit" in row and "Liu et al., NeurIPS 2020" in row and "'temperature': 1.0" in row
    assert "gradosr" in next(line for line in lines if line.startswith("plus "))


def test_tables_group_by_family_and_mark_own_presets():
    stats = {"auroc": {"mean": 0.5, "std": 0.0}}
    md = markdown_table({"msp": stats, "knn": stats, "plus": stats}).splitlines()
    assert [line.split("|")[1].strip() for line in md[2:]] == ["plus ★", "knn", "msp"]
    assert [line.split("|")[2].strip() for line in md[2:]] == ["gradient", "feature", "logit"]


def test_plots_show_the_presets_and_the_best_others():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50, int), -np.ones(50, int)]
    scores = {}
    base = np.linspace(0, 1, 50)
    for i in range(12):  # method i shifts the knowns by 0.05 i: its AUROC grows with i
        s = np.r_[base + 0.05 * i, base]
        scores[f"m{i}"] = SplitScores(s, s[:50])
    scores["plus"] = SplitScores(rng.normal(0, 1, 100), rng.normal(0, 1, 50))  # a poor own preset
    shown = shown_methods(scores, y)
    assert shown[0] == "plus" and shown[1:] == [f"m{i}" for i in range(11, 11 - TOP_OTHERS, -1)]
    assert len(shown_methods(scores, y, plot_all=True)) == len(scores)
    styles = {(curve_style(i)["color"], curve_style(i)["ls"]) for i in range(40)}
    assert len(styles) == 40  # no two of 40 curves share colour and line style
