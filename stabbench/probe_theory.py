"""The probe's comparisons with signal-propagation theory (docs/theory.md, docs/probe.md):

- `mean_field`: the mean-field predictions (stabbench.mean_field) for the method's network,
  as the method declares it (`Method.mean_field`), beside the same quantities measured on the
  drawn networks: q_l, the mean squared pre-activation of hidden layer l, against the length
  map iterated from each input's own q, and c_l, the correlation of the pre-activations of
  two inputs, against the two-input map iterated from theirs;
- `deep_jacobian`: the singular values of d x_depth / d x_1 (Pennington, Schoenholz and
  Ganguli 2017), whose mean square the theory puts at chi_1^(depth-1).

Both read the networks through their modules (`layers`, `activation`), never a method's name.
"""
from __future__ import annotations

import numpy as np
import torch

from stabbench import mean_field

PAIRS = 8  # input pairs (examples 0 & 1, 2 & 3, ...) whose correlation is followed
# Draws whose deep Jacobian is computed (the first ones). At depth 200, width 500 one example's
# Jacobian is 199 products of 500 x 500 by 500 x 500 matrices, 50 GFLOP: ~7 s of CPU on the
# 2-core development VM, so all 16 draws x 2 examples would add ~4 minutes to a ~1 minute probe.
JACOBIAN_DRAWS = 4


def networks(ensemble, device) -> list:
    """(network, stacked) pairs covering every draw: the bound stacked network once, else each member."""
    if ensemble.stacked:
        return [(ensemble.network, True)]
    return [(ensemble.member(k, device), False) for k in range(ensemble.size)]


@torch.no_grad()
def pre_activation_stats(ensemble, x: torch.Tensor, device) -> dict[str, np.ndarray]:
    """q [E, depth]: mean over examples and units of h_l^2 for each hidden layer; c [E, pairs, depth]:
    <h_a, h_b> / (|h_a| |h_b|) of the input pairs. The pre-activations are recomputed layer by
    layer from the network's own modules (no dropout: the theory's network), in the mode the
    probe's forward ran in; the training step is untouched."""
    pairs = min(PAIRS, len(x) // 2)
    q_all, c_all = [], []
    for network, stacked in networks(ensemble, device):
        h_in = network.map_input(x.expand(ensemble.size, *x.shape) if stacked else x[None])
        qs, cs = [], []
        for layer in network.layers[:-1]:
            h = layer(h_in if stacked else h_in[0])
            h = h if stacked else h[None]  # [e, B, width]
            h64 = h.double()
            qs.append((h64 ** 2).mean((-1, -2)))
            a, b = h64[:, 0:2 * pairs:2], h64[:, 1:2 * pairs:2]
            cs.append((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)))
            h_in = network.activation(h if stacked else h[0])
            h_in = h_in if stacked else h_in[None]
        q_all.append(torch.stack(qs, -1))
        c_all.append(torch.stack(cs, -1))
    return {"q": torch.cat(q_all).cpu().numpy(), "c": torch.cat(c_all).cpu().numpy()}


def theory_curves(spec, activation, x: torch.Tensor, depth: int) -> dict[str, np.ndarray]:
    """The maps iterated from the inputs: q_theory [depth] (mean over examples of each one's
    own length iteration, as the measured q_l averages over them) and c_theory [depth] (mean
    over the same pairs as measured)."""
    x = x.detach().double().cpu().numpy()
    pairs = min(PAIRS, len(x) // 2)
    q_input = (x ** 2).mean(1)
    q1 = spec.input_weight_var * q_input + spec.input_bias_var
    q_theory = mean_field.iterate_length(activation, q1, depth, spec.weight_var, spec.bias_var).mean(1)
    a, b = x[0:2 * pairs:2], x[1:2 * pairs:2]
    q1a, q1b = q1[0:2 * pairs:2], q1[1:2 * pairs:2]
    c1 = (spec.input_weight_var * (a * b).mean(1) + spec.input_bias_var) / np.sqrt(q1a * q1b)
    c_theory = mean_field.iterate_correlation(activation, q1a, q1b, c1, depth, spec.weight_var, spec.bias_var)
    return {"q_theory": q_theory, "c_theory": c_theory.mean(1)}


def mean_field_block(spec, activation, x: torch.Tensor, measured: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """probe.json's `mean_field` block and the per-layer theory columns (empty where the theory
    does not apply to this method)."""
    depth = measured["q"].shape[1]
    q = measured["q"].mean(0)
    c = measured["c"].mean((0, 1))
    block = {"applies": spec.applies, "note": spec.note or None,
             "measured": {"q": q.tolist(), "c": c.tolist(), "layers": f"h_1..h_{depth} (pre-activations)",
                          "pairs": int(measured["c"].shape[1])}}
    if not spec.applies:
        return block, {}
    prediction = mean_field.predict(activation, spec.weight_var, spec.bias_var)
    curves = theory_curves(spec, activation, x, depth)
    block.update({
        "weights": spec.weights, "input_weight_var": spec.input_weight_var, "input_bias_var": spec.input_bias_var,
        **prediction.as_dict(),
        "critical_weight_var": mean_field.critical_weight_var(activation, spec.bias_var),
        "q_theory": curves["q_theory"].tolist(), "c_theory": curves["c_theory"].tolist(),
        "q_max_relative_error": float(np.max(np.abs(q - curves["q_theory"]) / curves["q_theory"])),
        "c_max_abs_error": float(np.max(np.abs(c - curves["c_theory"]))),
    })
    return block, curves


def deep_jacobian_singular_values(ensemble, x: torch.Tensor, examples: int, device,
                                  draws: int | None = None) -> np.ndarray:
    """Singular values of d x_depth / d x_1 (hidden layer 1 to hidden layer depth, width x width)
    for the first `examples` inputs of the first `draws` draws: [draws, examples, width], in
    float64 (in float32 the smallest values and the mean log are rounding floors, ~1e-11 where
    float64 gives 1e-19). In eval mode (no dropout, batch norm's running statistics: at init
    the identity, so a batch-normed net's Jacobian here leaves its normalisation out), by reverse mode: one
    vector-Jacobian product per unit of x_depth, batched. Measured at depth 20, width 500 on the
    2-core VM: 0.64 s of CPU per example reverse, 0.83 s forward (jacfwd), 0.9 s the SVD."""
    from torch.func import jacrev, vmap

    values = []
    for k in range(min(ensemble.size, ensemble.size if draws is None else draws)):
        member = ensemble.member(k, device).double().eval()  # float64: float32's floor is ~1e-11 of the largest
        hidden = member.layers[:-1]

        def deep(x1):
            for layer in hidden[1:]:
                x1 = member.activation(layer(x1[None]))[0]
            return x1

        with torch.no_grad():
            x1 = member.activation(hidden[0](member.map_input(x[:examples].double())))
        jac = vmap(jacrev(deep))(x1.detach()).detach().double()
        finite = torch.isfinite(jac).flatten(1).all(-1)
        sv = torch.linalg.svdvals(torch.where(finite[:, None, None], jac, torch.zeros_like(jac)))
        values.append(sv.masked_fill(~finite[:, None], float("nan")))
        del member
    if not values:
        return np.empty((0, examples, 0))
    return torch.stack(values).cpu().numpy()


def eval_mode_note(ensemble) -> str:
    """What eval mode changes in this network's Jacobians, for their `of` label: batch norm
    normalises by its running statistics (at init mean 0, variance 1: the identity), not by
    the batch's as every training step does."""
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ensemble.skeleton.modules())
    return ("; batch norm at its running statistics (the identity at init), not the batch's as in training"
            if batch_norm else "")


def deep_jacobian_block(sv: np.ndarray, mean_field_block: dict, spec, activation, x: torch.Tensor, depth: int,
                        mode_note: str = "") -> dict:
    """Moments of the singular values (pooled over draws and examples) and the theory's mean
    squared singular value: chi_1^(depth-1) at the fixed point (Pennington et al. 2017), and
    the product of sigma_w^2 E[phi'(h_l)^2] over layers 2..depth along the length map's q_l
    from each Jacobian example's own input, averaged over them (the same where q_l has reached
    q*, the wide limit's value where it has not)."""
    finite = sv[np.isfinite(sv)]
    squares = finite ** 2
    block = {
        "of": f"d x_{depth} / d x_1, eval mode{mode_note}", "examples_per_network": int(sv.shape[1]),
        "values_per_example": int(sv.shape[2]),
        "mean_squared": float(squares.mean()) if finite.size else None,
        "variance_of_squares": float(squares.var()) if finite.size else None,
        "mean": float(finite.mean()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "min": float(finite.min()) if finite.size else None,
        "mean_log": float(np.log(finite).mean()) if finite.size and (finite > 0).all() else None,
        "theory_mean_squared": None,
        "theory_mean_squared_along_q": None,
    }
    if mean_field_block.get("applies"):
        block["theory_mean_squared"] = mean_field_block["chi_1"] ** (depth - 1)
        inputs = x[:sv.shape[1]].detach().double().cpu().numpy()
        q1 = spec.input_weight_var * (inputs ** 2).mean(1) + spec.input_bias_var
        q_path = mean_field.iterate_length(activation, q1, depth, spec.weight_var, spec.bias_var)[1:]
        slopes = mean_field.gaussian_moments(activation, q_path)["slope2"]  # [depth-1, examples]
        block["theory_mean_squared_along_q"] = float(np.prod(spec.weight_var * slopes, 0).mean())
    return block


def plot_mean_field(ax, per_layer: dict[str, np.ndarray], block: dict) -> None:
    """q_l measured (one thin line per draw, median in black) against the length map's
    iteration (dashed), log scale; c_l (mean over pairs) and its map on a second axis."""
    depth = per_layer["q"].shape[1] - 1
    layers = np.arange(1, depth + 1)
    q = np.where(per_layer["q"][:, :depth] > 0, per_layer["q"][:, :depth], np.nan)
    for row in q:
        ax.plot(layers, row, color="tab:blue", alpha=0.25, linewidth=0.8)
    with np.errstate(all="ignore"):
        ax.plot(layers, np.exp(np.nanmedian(np.log(q), 0)), color="black", linewidth=1.6, label="q_l measured (median)")
    if "q_theory" in per_layer:
        ax.plot(layers, per_layer["q_theory"][0, :depth], color="tab:red", linestyle="--", linewidth=1.6,
                label="q_l length map")
    ax.set_yscale("log")
    ax.set_xlabel("hidden layer l")
    ax.set_ylabel("q_l: mean squared pre-activation")
    ax.grid(True, which="both", alpha=0.3)
    twin = ax.twinx()
    twin.plot(layers, np.nanmean(per_layer["c"][:, :depth], 0), color="tab:green", linewidth=1.2,
              label="c_l measured (mean)")
    if "c_theory" in per_layer:
        twin.plot(layers, per_layer["c_theory"][0, :depth], color="tab:olive", linestyle=":", linewidth=1.6,
                  label="c_l correlation map")
    twin.set_ylabel("c_l: correlation of two inputs")
    twin.set_ylim(min(-0.05, float(np.nanmin(per_layer["c"][:, :depth])) - 0.05), 1.05)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="best", fontsize=7)
    if block.get("applies"):
        fmt = lambda v: "inf" if v is None else f"{v + 0.0:.3g}"
        xi_c = "n/a" if "xi_c" in (block.get("undefined") or {}) else fmt(block["xi_c"])
        ax.set_title(f"mean field: sigma_w^2 {block['weight_var']:.3g}, sigma_b^2 {block['bias_var']:.3g}: "
                     f"{block['phase']}, chi_1 {fmt(block['chi_1'])}, xi_c {xi_c}", fontsize=9)
    else:
        ax.set_title("mean field: no prediction for this method (measured only)", fontsize=9)


def plot_deep_jacobian(ax, sv: np.ndarray | None, block: dict | None) -> None:
    """Histogram of the deep Jacobian's singular values (log x), measured and theory mean square."""
    if sv is None or block is None or not np.isfinite(sv).any() or not (sv[np.isfinite(sv)] > 0).any():
        ax.text(0.5, 0.5, "deep Jacobian: not computed\n(probe.jacobian_examples=0 or depth < 2)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    values = sv[np.isfinite(sv) & (sv > 0)]
    bins = np.geomspace(values.min(), values.max() * 1.0001, 60) if values.max() > values.min() else 10
    ax.hist(values, bins=bins, color="tab:blue", alpha=0.7)
    ax.set_xscale("log")
    ax.axvline(np.sqrt(block["mean_squared"]), color="black", linewidth=1.4, label="sqrt(mean s^2) measured")
    if block.get("theory_mean_squared"):
        ax.axvline(np.sqrt(block["theory_mean_squared"]), color="tab:red", linestyle="--", linewidth=1.4,
                   label="sqrt(chi_1^(depth-1)) theory")
    ax.set_xlabel(f"singular value of {block['of']}")
    ax.set_ylabel("count")
    ax.legend(loc="best", fontsize=7)
    ax.set_title(f"deep Jacobian: {block['examples_per_network']} examples per draw, "
                 f"{block['values_per_example']} values each", fontsize=9)


def table_rows(block: dict, jacobian: dict | None, depth: int) -> list[tuple[str, str]]:
    """The probe table's mean-field and deep-Jacobian rows."""
    fmt = lambda v: "inf" if v is None else f"{v + 0.0:.4g}"  # null: an infinite depth scale; + 0.0: never "-0"
    undefined = block.get("undefined") or {}
    predicted = lambda key: "n/a" if key in undefined else fmt(block[key])  # no value where q* is 0 or inf
    q, c = block["measured"]["q"], block["measured"]["c"]
    rows = []
    if block["applies"]:
        rows += [
            ("mean field: sigma_w^2, sigma_b^2", f"{fmt(block['weight_var'])}, {fmt(block['bias_var'])} "
                                                 f"({block['weights']})"),
            ("  phase (chi_1; critical sigma_w^2)", f"{block['phase']} ({fmt(block['chi_1'])}; "
                                                   f"{fmt(block['critical_weight_var'])})"),
            ("  q*, c*, chi_c", f"{fmt(block['q_star'])}, {predicted('c_star')}, {predicted('chi_c')}"),
            ("  xi_q, xi_c, 6 xi_c (layers)", f"{fmt(block['xi_q'])}, {predicted('xi_c')}, {predicted('six_xi_c')}"),
        ]
        if undefined:
            rows.append(("  n/a because", next(iter(undefined.values()))))
        rows += [
            (f"  q_{depth} measured / length map", f"{fmt(q[-1])} / {fmt(block['q_theory'][-1])}  "
                                                   f"(max rel. error {fmt(block['q_max_relative_error'])})"),
            (f"  c_{depth} measured / correlation map", f"{fmt(c[-1])} / {fmt(block['c_theory'][-1])}  "
                                                       f"(max abs. error {fmt(block['c_max_abs_error'])})"),
        ]
    else:
        rows += [("mean field", "no prediction: " + (block["note"] or "")),
                 (f"  q_{depth}, c_{depth} measured", f"{fmt(q[-1])}, {fmt(c[-1])}")]
    if jacobian:
        theory = jacobian["theory_mean_squared"]
        rows.append((f"deep Jacobian mean s^2 (x_{depth}/x_1)",
                     f"{fmt(jacobian['mean_squared'])}" + (f" / theory {fmt(theory)}" if theory is not None else "")
                     + f"  [{fmt(jacobian['min'])}, {fmt(jacobian['max'])}]"))
        if ";" in jacobian["of"]:  # eval mode differs from training (batch norm): say so beside the figure
            rows.append(("  taken in", jacobian["of"].split(", ", 1)[1]))
    return rows
