"""Alpha-beta collective costs (ring algorithms), from a profile's link table.

For a group of n devices on link type ℓ (``nvlink`` inside a node, ``ib`` when the group spans nodes),
with bus bandwidth β = ``profile.link(ℓ, n).bandwidth_bytes_per_s`` and latency α = ``latency_s``;
``num_bytes`` is the size of the full (reduced / gathered) buffer::

    all_reduce_time_s      = α + 2·(n−1)/n · num_bytes / β
    all_gather_time_s      = α + (n−1)/n · num_bytes / β     (same for reduce_scatter_time_s)
    p2p_time_s             = α + num_bytes / β               (one send/receive pair)
    host_copy_time_s       = α_host + num_bytes / β_host     (pinned host <-> device)

n = 1 costs nothing (world size 1 short-circuits).
"""

from __future__ import annotations

from collections.abc import Iterable

from planner.cost_model.profile import LinkRate, Profile


def link_type(cluster, devices: Iterable[int]) -> str:
    """``nvlink`` when every device is in one node, else ``ib``."""
    return "nvlink" if cluster.same_node(tuple(devices)) else "ib"


def group_rate(profile: Profile, cluster, group: tuple[int, ...]) -> LinkRate:
    return profile.link(link_type(cluster, group), len(group))


def all_reduce_time_s(num_bytes: float, n: int, rate: LinkRate) -> float:
    if n <= 1 or num_bytes <= 0:
        return 0.0
    return rate.latency_s + 2 * (n - 1) / n * num_bytes / rate.bandwidth_bytes_per_s


def all_gather_time_s(num_bytes: float, n: int, rate: LinkRate) -> float:
    if n <= 1 or num_bytes <= 0:
        return 0.0
    return rate.latency_s + (n - 1) / n * num_bytes / rate.bandwidth_bytes_per_s


reduce_scatter_time_s = all_gather_time_s


def p2p_time_s(num_bytes: float, rate: LinkRate) -> float:
    if num_bytes <= 0:
        return 0.0
    return rate.latency_s + num_bytes / rate.bandwidth_bytes_per_s


def host_copy_time_s(num_bytes: float, profile: Profile, cluster) -> float:
    """Pinned host <-> device copy; the profile's ``host`` rate, else the cluster's."""
    if num_bytes <= 0:
        return 0.0
    if "host" in profile.collectives:
        return p2p_time_s(num_bytes, profile.link("host", 1))
    return p2p_time_s(num_bytes, LinkRate(float(cluster.host_device_bandwidth_bytes_per_s), float(cluster.intra_node_latency_s)))
