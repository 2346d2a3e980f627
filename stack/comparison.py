"""The three serving targets of a side-by-side run, named for what answers them, and what they show.

Wherever both frameworks are served, three targets are measured: the PyTorch REST server, and
TensorFlow's server over REST and over gRPC. PyTorch REST against TensorFlow REST is the framework
difference (same protocol, same JSON); TensorFlow REST against TensorFlow gRPC is the protocol
difference (same server, same model). A TensorFlow target is named for the server that answers it:
``tf-standin-*`` for the stack's local stand-in, ``tf-serving-*`` for TensorFlow Serving itself (the
real ``tensorflow/serving`` image, under compose or Kubernetes).
"""

from __future__ import annotations

import html
from typing import Literal

from mnist_client.loadtest import Target, parse_target
from mnist_client.loadtest.report import Report
from mnist_client.loadtest.stats import Measurement

TfServer = Literal["tf-standin", "tf-serving"]
TORCH_REST = "torch-rest"

WHAT_ANSWERED = {
    "tf-standin": (
        "torch-rest is this project's PyTorch REST server (Flask under gunicorn) serving the TorchScript export. "
        "tf-standin-rest and tf-standin-grpc are the stack's TF Serving stand-in: a Python server with TF "
        "Serving's REST and gRPC APIs that runs the SavedModel through a TensorFlow Session as TF Serving does. "
        "It is not TensorFlow Serving: TF Serving's own C++ server is measured only under compose or Kubernetes, "
        "with the real tensorflow/serving image, where its targets are named tf-serving-rest and tf-serving-grpc."
    ),
    "tf-serving": (
        "torch-rest is this project's PyTorch REST server (Flask under gunicorn) serving the TorchScript export. "
        "tf-serving-rest and tf-serving-grpc are TensorFlow Serving itself (the tensorflow/serving image) "
        "serving the SavedModel."
    ),
}


def serving_targets(torch_rest_url: str, tf_rest_url: str, tf_grpc_target: str, tf_server: TfServer) -> tuple[
    Target, Target, Target
]:
    """PyTorch REST, TensorFlow REST, TensorFlow gRPC, named for what answers them."""
    return (
        parse_target(f"{TORCH_REST}={torch_rest_url}", "rest"),
        parse_target(f"{tf_server}-rest={tf_rest_url}", "rest"),
        parse_target(f"{tf_server}-grpc={tf_grpc_target}", "grpc"),
    )


def _median(m: Measurement, figure: str) -> float:
    """The median over the point's rounds, or the pooled figure when it ran once."""
    stats = m.round_stats().get(figure)
    if stats is not None:
        return float(stats["median"])
    return m.throughput_rps if figure == "throughput_rps" else m.latency_ms()["p50"]


def differences(report: Report, tf_server: TfServer) -> list[dict[str, float]]:
    """Per sweep point: the framework ratio (TF REST over PyTorch REST) and the protocol ratio (TF gRPC
    over TF REST), for the median p50 latency and the median requests/s."""
    tf_rest, tf_grpc = f"{tf_server}-rest", f"{tf_server}-grpc"
    rows = []
    for m in report.measurements:
        if m.target != TORCH_REST:
            continue
        try:
            rest, grpc = report.measurement(tf_rest, m.point), report.measurement(tf_grpc, m.point)
        except KeyError:
            continue
        if not (m.ok and rest.ok and grpc.ok):
            continue
        rows.append({
            "point": m.point,
            "framework_p50": _median(rest, "p50_ms") / _median(m, "p50_ms"),
            "framework_rps": _median(rest, "throughput_rps") / _median(m, "throughput_rps"),
            "protocol_p50": _median(grpc, "p50_ms") / _median(rest, "p50_ms"),
            "protocol_rps": _median(grpc, "throughput_rps") / _median(rest, "throughput_rps"),
        })
    return rows


def format_text(report: Report, tf_server: TfServer) -> str:
    """What answered, then the framework and protocol differences in words and figures."""
    tf_rest, tf_grpc = f"{tf_server}-rest", f"{tf_server}-grpc"
    lines = [WHAT_ANSWERED[tf_server], ""]
    for row in differences(report, tf_server):
        point = f"concurrency {row['point']:g}" if report.measurements[0].mode == "closed" else f"{row['point']:g}/s"
        lines.append(
            f"{point}: framework (REST against REST): {tf_rest} p50 {row['framework_p50']:.2f}x and req/s "
            f"{row['framework_rps']:.2f}x {TORCH_REST}'s; protocol (same server): {tf_grpc} p50 "
            f"{row['protocol_p50']:.2f}x and req/s {row['protocol_rps']:.2f}x {tf_rest}'s"
        )
    lines.append("(medians over each point's rounds; a p50 ratio below 1 or a req/s ratio above 1 favours the first "
                 "named target)")
    return "\n".join(lines)


def format_html(report: Report, tf_server: TfServer) -> str:
    tf_rest, tf_grpc = f"{tf_server}-rest", f"{tf_server}-grpc"
    head = ("<tr><th class='l'>point</th>"
            f"<th>{html.escape(tf_rest)} / {TORCH_REST} p50</th><th>{html.escape(tf_rest)} / {TORCH_REST} req/s</th>"
            f"<th>{html.escape(tf_grpc)} / {html.escape(tf_rest)} p50</th>"
            f"<th>{html.escape(tf_grpc)} / {html.escape(tf_rest)} req/s</th></tr>")
    rows = "".join(
        f"<tr><td class='l'>{row['point']:g}</td><td>{row['framework_p50']:.2f}</td><td>{row['framework_rps']:.2f}"
        f"</td><td>{row['protocol_p50']:.2f}</td><td>{row['protocol_rps']:.2f}</td></tr>"
        for row in differences(report, tf_server)
    )
    return (f"<p>{html.escape(WHAT_ANSWERED[tf_server])}</p><p>The framework difference is TensorFlow REST "
            "against PyTorch REST (same protocol, same JSON); the protocol difference is TensorFlow gRPC against "
            "TensorFlow REST (same server, same model). Ratios of the medians over each point's rounds; a p50 "
            "ratio below 1 or a req/s ratio above 1 favours the first named target.</p>"
            f"<table>{head}{rows}</table>")
