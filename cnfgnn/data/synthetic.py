"""Built-in synthetic road network with a queue-based traffic model (the default dataset).

Network (:mod:`cnfgnn.data.roads`): a grid of two-way roads, sensors every ~``spacing_km``
along each carriageway, turns at crossings; the adjacency is the DCRNN thresholded Gaussian
kernel of the directed road distances (pairs farther than ``cutoff_km`` count as unlisted, as
in DCRNN's distance file); locations are lat/lon of the sensors.

Traffic model, per step t and sensor v (flows in units of the road's capacity):

* **Demand.** ``D_v(t) = level_v * P(time of day, day of week; AM/PM weight of the
  direction) * exp(xi(t) + delta_day)``. P (:class:`DemandShape`) has a night low, a daytime
  plateau, AM (08:00) and PM (17:30) rush-hour peaks on weekdays (each road has an AM-heavy
  and a PM-heavy direction), a midday hump on weekends and a busier Friday evening. ``xi`` is
  an AR(1) process (``fluctuation_minutes``, ``fluctuation_sd``): one per carriageway for the
  traffic entering it, one per on-ramp; ``delta_day`` is a day-to-day factor (``day_sd``).
* **Flow propagation (downstream).** Traffic enters at the first sensor of a carriageway
  (``D``) and at on-ramps (``exit_share * D``). A sensor's arriving flow ``a`` is the sum over
  its upstream road-graph edges of ``share * outflow(upstream, t - lag)``: ``exit_share``
  leaves at each off-ramp, ``turn_share`` takes each turn at a crossing, the rest goes
  through. The lag is the edge length over ``wave_kmh`` (speed of density changes in dense
  traffic), at least one step: demand surges reach downstream sensors later.
* **Bottlenecks and queues.** Capacity is 1 (``bottleneck_capacity`` at a share
  ``bottleneck_share`` of sensors); random **incidents** (``incidents_per_node_week``,
  15 min + exponential duration, severity 0.3-0.7) cut it. Arrivals above capacity build a
  queue ``Q_v(t) = max(0, Q_v(t-1) + a - capacity)``; the outflow is what passes, so sensors
  downstream of a bottleneck are starved.
* **Spill-back (upstream).** The queue occupies ``queue_km_per_unit * Q`` km of road; its
  tail reaches an upstream sensor u, ``len`` km before v, after ``len / queue_wave_kmh``
  (the backward shock wave): ``R_u(t) = max(own queue, R_v(t - lag) - len)`` over u's
  successors, and congestion ``c = 0.85 * (1 - exp(-R / 0.5 km))``.
* **Speed.** ``v = v_free * (1 - 0.08 a^2 - near_capacity_drop * sigmoid((a - 0.95) / 0.04))
  * (1 - c) * (1 - 0.25 s)`` (s = severity of an incident at the sensor itself) plus Gaussian
  sensor noise (``noise_mph``), clipped to [3, v_free + 5] mph.
* **Missing readings.** Half of ``missing_rate`` as isolated readings, half as outages of
  geometric length (mean 2 h); missing entries are 0 with ``mask`` False.

So a sensor's future depends on its neighbours' recent past in both directions: demand and
starvation travel downstream, congestion travels upstream, each with a delay. A ridge
forecast of a sensor's next hour from its own past hour improves by about 20% (held-out MSE)
when its upstream neighbours' past hour is added (tests/data/test_synthetic.py). Everything
is drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same data. The time
loop is vectorised over sensors (207 sensors x 28 days in about a second).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cnfgnn.data.checks import regular_timestamps
from cnfgnn.data.dataset import SensorData
from cnfgnn.data.errors import bad_input
from cnfgnn.data.graph import gaussian_kernel_adjacency
from cnfgnn.data.roads import RoadNetwork, road_distances, road_network

MINUTES_PER_DAY = 24 * 60


def _gauss(h: np.ndarray, mu: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((h - mu) / sd) ** 2)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class DemandShape:
    """Shape of the demand profile (fractions of capacity; clock hours).

    Weekdays: ``night + day * plateau(h) + peak * (am * G(h; am_hour) + pm * G(h; pm_hour))``
    with a Friday-evening boost; weekends: a lower plateau plus a midday hump, Sunday quieter.
    """

    night: float = 0.12
    day: float = 0.38
    day_start: tuple[float, float] = (6.0, 0.7)  # hour, steepness of the morning rise
    day_end: tuple[float, float] = (21.5, 1.2)  # hour, steepness of the evening fall
    peak: float = 0.45
    am: tuple[float, float] = (8.0, 1.0)  # hour, width of the AM rush
    pm: tuple[float, float] = (17.5, 1.3)  # hour, width of the PM rush
    friday: tuple[float, float, float] = (0.06, 17.5, 2.0)  # extra share, hour, width
    weekend_night: float = 0.10
    weekend_day: float = 0.33
    weekend_start: tuple[float, float] = (8.5, 1.0)
    weekend_hump: tuple[float, float, float] = (0.15, 13.5, 2.5)  # height, hour, width
    sunday_factor: float = 0.9


def demand_profile(
    timestamps: pd.DatetimeIndex, peak_weights: np.ndarray, shape: DemandShape = DemandShape()
) -> np.ndarray:
    """Daily/weekly demand shape ``P`` per step and sensor.

    Args:
        timestamps: ``[T]``.
        peak_weights: ``[N, 2]`` (AM, PM) rush-hour weights of each sensor's direction.
        shape: the profile's constants.

    Returns:
        ``[T, N]`` demand as a fraction of capacity (about 0.1 at night, ~0.95 at the peak).
    """
    c = shape
    h = ((timestamps.hour + timestamps.minute / 60.0).to_numpy(np.float64))[:, None]
    dow = timestamps.day_of_week.to_numpy()[:, None]
    day = c.night + c.day * _sigmoid((h - c.day_start[0]) / c.day_start[1]) * _sigmoid(
        (c.day_end[0] - h) / c.day_end[1]
    )
    am, pm = peak_weights[None, :, 0], peak_weights[None, :, 1]
    weekday = day + c.peak * (am * _gauss(h, *c.am) + pm * _gauss(h, *c.pm))
    friday = 1.0 + c.friday[0] * _gauss(h, *c.friday[1:])
    weekday = weekday * np.where(dow == 4, friday, 1.0)
    weekend = (
        c.weekend_night
        + c.weekend_day
        * _sigmoid((h - c.weekend_start[0]) / c.weekend_start[1])
        * _sigmoid((c.day_end[0] - h) / c.day_end[1])
        + c.weekend_hump[0] * _gauss(h, *c.weekend_hump[1:])
    )
    weekend = weekend * np.where(dow == 6, c.sunday_factor, 1.0)
    return np.where(dow >= 5, weekend, weekday)


def _ar1(rng: np.random.Generator, steps: int, n: int, phi: float, sd: float) -> np.ndarray:
    """``[steps, n]`` stationary AR(1) with marginal std ``sd``."""
    eps = rng.standard_normal((steps, n)) * sd * np.sqrt(1.0 - phi**2)
    out = np.empty((steps, n))
    out[0] = rng.standard_normal(n) * sd
    for t in range(1, steps):
        out[t] = phi * out[t - 1] + eps[t]
    return out


def _lags(length_km: np.ndarray, speed_kmh: float, interval: float) -> tuple[np.ndarray, ...]:
    """Fractional lags (>= 1 step) as (integer part, weight of it, weight of one more step)."""
    lag = np.maximum(length_km / speed_kmh * 60.0 / interval, 1.0)
    lo = np.floor(lag).astype(np.int64)
    frac = lag - lo
    return lo, 1.0 - frac, frac


def _incidents(
    rng: np.random.Generator,
    steps: int,
    n: int,
    rate_week: float,
    interval: float,
    min_minutes: float = 15.0,
    mean_extra_minutes: float = 30.0,
    severity: tuple[float, float] = (0.3, 0.7),
) -> tuple[np.ndarray, np.ndarray]:
    """Capacity multiplier and incident severity at each sensor, both ``[steps, n]``.

    Incidents start as a Poisson process (``rate_week`` per sensor and week), last
    ``min_minutes`` plus an exponential time, and remove a ``severity`` share of capacity.
    """
    cap_mult = np.ones((steps, n))
    sev = np.zeros((steps, n))
    per_step = rate_week / (7 * MINUTES_PER_DAY / interval)
    hits = np.argwhere(rng.random((steps, n)) < per_step)
    dur = np.ceil((min_minutes + rng.exponential(mean_extra_minutes, len(hits))) / interval).astype(
        np.int64
    )
    s = rng.uniform(*severity, len(hits))
    for (t0, v), d, sv in zip(hits, dur, s, strict=True):
        cap_mult[t0 : t0 + d, v] = np.minimum(cap_mult[t0 : t0 + d, v], 1.0 - sv)
        sev[t0 : t0 + d, v] = np.maximum(sev[t0 : t0 + d, v], sv)
    return cap_mult, sev


def _route_shares(net: RoadNetwork, exit_share: float, turn_share: float) -> np.ndarray:
    """``[E]`` fraction of a sensor's outflow sent along each road-graph edge."""
    n = net.num_nodes
    turns_out = np.bincount(net.src[net.turn], minlength=n)
    share = np.where(net.turn, turn_share, 1.0 - exit_share - turn_share * turns_out[net.src])
    return share


def simulate_speeds(
    net: RoadNetwork,
    timestamps: pd.DatetimeIndex,
    interval: float,
    rng: np.random.Generator,
    warmup_steps: int,
    *,
    exit_share: float,
    turn_share: float,
    wave_kmh: float,
    queue_wave_kmh: float,
    queue_km_per_unit: float,
    fluctuation_minutes: float,
    fluctuation_sd: float,
    day_sd: float,
    bottleneck_share: float,
    bottleneck_capacity: tuple[float, float],
    incidents_per_node_week: float,
    free_speed_mph: tuple[float, float],
    noise_mph: float,
    demand_level: tuple[float, float],
    near_capacity_drop: float,
    max_congestion: float = 0.85,
    queue_scale_km: float = 0.5,
    flow_drop: float = 0.08,
    capacity_knee: tuple[float, float] = (0.95, 0.04),
    incident_slowdown: float = 0.25,
    min_speed_mph: float = 3.0,
    over_free_mph: float = 5.0,
    max_load: float = 1.3,
) -> np.ndarray:
    """Run the traffic model; returns ``[T, N]`` float64 speeds (mph), warm-up dropped.

    The keyword-only arguments are those of :func:`generate_synthetic`; the defaulted ones
    shape the speed model: ``max_congestion`` and ``queue_scale_km`` (congestion
    ``c = max_congestion * (1 - exp(-R / queue_scale_km))``), ``flow_drop`` (free-flow
    slow-down ``flow_drop * a^2``), ``capacity_knee`` (centre, width of the extra drop near
    capacity; loads above ``max_load`` count as ``max_load``), ``incident_slowdown`` (at
    the incident itself) and the speed clip.
    """
    n, steps = net.num_nodes, len(timestamps)
    level = rng.uniform(*demand_level, n)
    phi = float(np.exp(-interval / fluctuation_minutes))
    days = (timestamps.normalize() - timestamps[0].normalize()).days.to_numpy()
    day_factor = rng.standard_normal((days.max() + 1, 1)) * day_sd
    corridor = _ar1(rng, steps, int(net.carriageway.max()) + 1, phi, fluctuation_sd)
    local = np.where(
        net.entry, corridor[:, net.carriageway], _ar1(rng, steps, n, phi, fluctuation_sd)
    )
    demand = level * demand_profile(timestamps, net.peak_weights) * np.exp(local + day_factor[days])
    exo = np.where(net.entry, 1.0, exit_share) * demand  # entering + on-ramp flow [T, N]
    cap = np.where(rng.random(n) < bottleneck_share, rng.uniform(*bottleneck_capacity, n), 1.0)
    cap_mult, sev = _incidents(rng, steps, n, incidents_per_node_week, interval)
    capacity = cap * cap_mult
    share = _route_shares(net, exit_share, turn_share)
    f_lo, f_w0, f_w1 = _lags(net.length_km, wave_kmh, interval)
    b_lo, b_w0, b_w1 = _lags(net.length_km, queue_wave_kmh, interval)
    pad = int(max(f_lo.max(initial=1), b_lo.max(initial=1))) + 2
    out = np.zeros((steps + pad, n))  # outflow history (padded in front)
    ext = np.zeros((steps + pad, n))  # queue extent history (km beyond each sensor)
    arrivals = np.empty((steps, n))
    queue = np.zeros(n)
    src, dst, length = net.src, net.dst, net.length_km
    for t in range(steps):
        k = t + pad
        up = share * (f_w0 * out[k - f_lo, src] + f_w1 * out[k - f_lo - 1, src])  # [E]
        a = exo[t] + np.bincount(dst, up, minlength=n)
        q_new = np.maximum(queue + a - capacity[t], 0.0)
        out[k] = a + queue - q_new
        queue = q_new
        spill = b_w0 * ext[k - b_lo, dst] + b_w1 * ext[k - b_lo - 1, dst] - length  # [E]
        e = queue * queue_km_per_unit
        np.maximum.at(e, src, spill)
        ext[k] = e
        arrivals[t] = a
    congestion = max_congestion * (1.0 - np.exp(-ext[pad:] / queue_scale_km))
    v_free = rng.uniform(*free_speed_mph, n)
    a = np.minimum(arrivals, max_load)
    drop = flow_drop * a**2 + near_capacity_drop * _sigmoid(
        (a - capacity_knee[0]) / capacity_knee[1]
    )
    speed = v_free * (1.0 - drop) * (1.0 - congestion) * (1.0 - incident_slowdown * sev)
    speed += rng.standard_normal(speed.shape) * noise_mph
    return np.clip(speed, min_speed_mph, v_free + over_free_mph)[warmup_steps:]


def _pair(value: Sequence[float], key: str) -> tuple[float, float]:
    """A ``(low, high)`` range from the config (a list there) as a tuple."""
    if len(value) != 2:
        raise bad_input("synthetic dataset", f"{key}={list(value)}", f"give {key} as [low, high]")
    return value[0], value[1]


def _missing_mask(
    rng: np.random.Generator,
    steps: int,
    n: int,
    rate: float,
    interval: float,
    outage_hours: float = 2.0,
) -> np.ndarray:
    """``[steps, n]`` bool observed-mask: isolated drop-outs and outages, ``rate`` in total."""
    observed = rng.random((steps, n)) >= rate / 2
    mean_len = max(outage_hours * 60.0 / interval, 1.0)
    starts = np.argwhere(rng.random((steps, n)) < rate / 2 / mean_len)
    lengths = rng.geometric(1.0 / mean_len, len(starts))
    for (t0, v), d in zip(starts, lengths, strict=True):
        observed[t0 : t0 + d, v] = False
    return observed


def generate_synthetic(
    num_nodes: int = 24,
    days: float = 14,
    interval_minutes: float = 5.0,
    seed: int = 0,
    missing_rate: float = 0.03,
    start: str = "2024-01-01",
    spacing_km: float = 2.0,
    cutoff_km: float | None = None,
    cutoff_spacings: float = 10.0,
    threshold: float = 0.1,
    free_speed_mph: tuple[float, float] = (60.0, 70.0),
    noise_mph: float = 1.5,
    exit_share: float = 0.08,
    turn_share: float = 0.06,
    wave_kmh: float = 25.0,
    queue_wave_kmh: float = 18.0,
    queue_km_per_unit: float = 1.0,
    fluctuation_minutes: float = 45.0,
    fluctuation_sd: float = 0.12,
    day_sd: float = 0.05,
    bottleneck_share: float = 0.2,
    bottleneck_capacity: tuple[float, float] = (0.85, 0.97),
    incidents_per_node_week: float = 0.5,
    demand_level: tuple[float, float] = (1.0, 1.25),
    near_capacity_drop: float = 0.35,
    warmup_days: float = 1.0,
    name: str = "synthetic",
) -> SensorData:
    """Generate a synthetic sensor network (see the module docstring for the model).

    Args:
        num_nodes: number of sensors N (1 to thousands).
        days: length of the series in days.
        interval_minutes: step length.
        seed: everything is drawn from ``default_rng(seed)``.
        missing_rate: fraction of readings reported missing (0 with mask False).
        start: first timestamp (2024-01-01 is a Monday).
        spacing_km: mean distance between sensors along a carriageway.
        cutoff_km: road distances beyond this are unlisted for the kernel.
        cutoff_spacings: the cutoff when ``cutoff_km`` is None, in units of ``spacing_km``.
        threshold: Gaussian-kernel weights below this are dropped (DCRNN: 0.1).
        free_speed_mph: range of the sensors' free-flow speeds.
        noise_mph: std of the sensor noise.
        exit_share: share of the flow leaving at each sensor's off-ramp (and entering on-ramps).
        turn_share: share of the flow taking each turn at a crossing.
        wave_kmh: downstream speed of demand changes.
        queue_wave_kmh: upstream speed of the tail of a queue.
        queue_km_per_unit: km of road one capacity-step of queued traffic occupies.
        fluctuation_minutes: time scale of the demand fluctuations.
        fluctuation_sd: std of the log-demand fluctuations.
        day_sd: std of the day-to-day log-demand factor.
        bottleneck_share: fraction of sensors with reduced capacity.
        bottleneck_capacity: capacity range of those sensors.
        incidents_per_node_week: incident rate per sensor.
        demand_level: range of the sensors' peak demand relative to capacity.
        near_capacity_drop: extra relative speed drop as arrivals approach capacity.
        warmup_days: simulated before ``start`` and dropped (queues settle).
        name: dataset name.

    Returns:
        SensorData with ``[T, N]`` speeds (mph), mask, graph and locations.
    """
    steps = int(round(days * MINUTES_PER_DAY / interval_minutes))
    if num_nodes < 1 or steps < 1 or not 0.0 <= missing_rate < 1.0:
        raise bad_input(
            "synthetic dataset",
            f"num_nodes={num_nodes}, days={days}, missing_rate={missing_rate}",
            "use num_nodes >= 1, days > 0 and 0 <= missing_rate < 1",
        )
    rng = np.random.default_rng(seed)
    net = road_network(int(num_nodes), spacing_km, rng)
    dist = road_distances(net, cutoff_km if cutoff_km is not None else cutoff_spacings * spacing_km)
    adjacency = gaussian_kernel_adjacency(dist, threshold)
    warm = int(round(warmup_days * MINUTES_PER_DAY / interval_minutes))
    t0 = pd.Timestamp(start) - pd.Timedelta(minutes=warm * interval_minutes)
    ts_all = regular_timestamps(t0, warm + steps, interval_minutes)
    speed = simulate_speeds(
        net,
        ts_all,
        interval_minutes,
        rng,
        warm,
        exit_share=exit_share,
        turn_share=turn_share,
        wave_kmh=wave_kmh,
        queue_wave_kmh=queue_wave_kmh,
        queue_km_per_unit=queue_km_per_unit,
        fluctuation_minutes=fluctuation_minutes,
        fluctuation_sd=fluctuation_sd,
        day_sd=day_sd,
        bottleneck_share=bottleneck_share,
        bottleneck_capacity=_pair(bottleneck_capacity, "bottleneck_capacity"),
        incidents_per_node_week=incidents_per_node_week,
        free_speed_mph=_pair(free_speed_mph, "free_speed_mph"),
        noise_mph=noise_mph,
        demand_level=_pair(demand_level, "demand_level"),
        near_capacity_drop=near_capacity_drop,
    )
    mask = _missing_mask(rng, steps, net.num_nodes, missing_rate, interval_minutes)
    return SensorData(
        name=name,
        speed=np.where(mask, speed, 0.0).astype(np.float32),
        mask=mask,
        timestamps=ts_all[warm:],
        interval_minutes=interval_minutes,
        sensor_ids=[f"S{i:04d}" for i in range(net.num_nodes)],
        adjacency=adjacency,
        locations=net.latlon(),
    )
