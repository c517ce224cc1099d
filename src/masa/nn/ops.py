"""Builders of the operations that put masa's layers into a model: each builds uninitialised modules with
the shapes an operation records, on the device and dtype of the weight it replaces, and records it.

``masa.load`` replays them on a meta-device model before assigning the saved tensors; compression
replays them and assigns the tensors its method computed (``masa.compress.install``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from masa import surgery
from masa.arch.adapters import linear_weight, set_submodule
from masa.nn.basis import BasisLinear, SharedBasis, SparseCodeLinear
from masa.nn.lowrank import LowRankLinear
from masa.nn.shared import RefinedSharedLinear


def _like(model: nn.Module, name: str) -> torch.Tensor:
    weight, _ = linear_weight(model.get_submodule(name))
    return weight


def _lowrank(name: str, d_out: int, d_in: int, rank: int, bias: bool, like: torch.Tensor) -> LowRankLinear:
    try:
        return LowRankLinear(d_in, d_out, rank, bias=bias, device=like.device, dtype=like.dtype)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err


@surgery.register_replay("factorize")
def factorize(model: nn.Module, op: dict) -> None:
    """``{"op": "factorize", "module", "shape": [d_out, d_in], "rank", "bias"}``: a :class:`LowRankLinear`."""
    name = op["module"]
    set_submodule(model, name, _lowrank(name, *op["shape"], op["rank"], op["bias"], _like(model, name)))
    surgery.record(model, op)


@surgery.register_replay("refine_shared")
def refine_shared(model: nn.Module, op: dict) -> None:
    """``{"op": "refine_shared", "modules": [{"module", "rank"}]}``: wrap each shared layer with a
    low-rank correction (:class:`RefinedSharedLinear`)."""
    for entry in op["modules"]:
        shared = model.get_submodule(entry["module"])
        like = shared.coefficients
        correction = _lowrank(
            entry["module"], shared.out_features, shared.in_features, entry["rank"], False, like
        )
        set_submodule(model, entry["module"], RefinedSharedLinear(shared, correction))
    surgery.record(model, op)


def _install_group(model: nn.Module, members: list[str], make: Callable[[bool], nn.Module]) -> None:
    """Replace each member by ``make(owner)``: the first owns (registers) the shared part."""
    for i, name in enumerate(members):
        set_submodule(model, name, make(i == 0))


@surgery.register_replay("basis_share")
def basis_share(model: nn.Module, op: dict) -> None:
    """``{"op": "basis_share", "groups": [{"members", "shape", "bias", "rank", ...}]}``: one
    :class:`SharedBasis` per group, a :class:`BasisLinear` per member."""
    for spec in op["groups"]:
        (d_out, d_in), like = spec["shape"], _like(model, spec["members"][0])
        basis = SharedBasis(spec["rank"], d_in, device=like.device, dtype=like.dtype)
        _install_group(
            model,
            spec["members"],
            lambda owner, basis=basis, d_out=d_out, spec=spec, like=like: BasisLinear(
                basis, d_out, spec["bias"], owner, device=like.device, dtype=like.dtype
            ),
        )
    surgery.record(model, op)


@surgery.register_replay("sparse_code")
def sparse_code(model: nn.Module, op: dict) -> None:
    """``{"op": "sparse_code", "groups": [{"members", "shape", "bias", "atoms", "sparsity",
    "indices_dtype"}]}``: one dictionary per group, a :class:`SparseCodeLinear` per member."""
    for spec in op["groups"]:
        (d_out, d_in), like = spec["shape"], _like(model, spec["members"][0])
        basis = SharedBasis(spec["atoms"], d_in, device=like.device, dtype=like.dtype)
        indices = getattr(torch, spec["indices_dtype"])
        _install_group(
            model,
            spec["members"],
            lambda owner, basis=basis, d_out=d_out, spec=spec, like=like, indices=indices: SparseCodeLinear(
                basis,
                d_out,
                spec["sparsity"],
                spec["bias"],
                owner,
                indices,
                device=like.device,
                dtype=like.dtype,
            ),
        )
    surgery.record(model, op)


@surgery.register_replay("compensate")
def compensate(model: nn.Module, op: dict) -> None:
    """``{"op": "compensate", "modules": [{"module", "rank"}]}``: wrap each layer with its own low-rank
    correction (:class:`~masa.nn.compensated.CompensatedLinear`, EoRA)."""
    from masa.nn.compensated import CompensatedLinear

    for entry in op["modules"]:
        name, inner = entry["module"], model.get_submodule(entry["module"])
        d_out, d_in = _shape(inner)
        correction = _lowrank(name, d_out, d_in, entry["rank"], False, _any_tensor(inner))
        set_submodule(model, name, CompensatedLinear(inner, correction))
    surgery.record(model, op)


def _any_tensor(module: nn.Module) -> torch.Tensor:
    """A parameter of ``module`` (its weight when it has none) giving the device and dtype of its correction."""
    param = next(module.parameters(), None)
    return param if param is not None else linear_weight(module)[0]


def _shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a layer standing for a dense linear map."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    return tuple(linear_weight(module)[0].shape)
