"""Time stamps, plain Python: builtin_interfaces/Time-like objects (anything with sec and nanosec)
as integer nanoseconds or float seconds, and back."""
NS_PER_S = 1_000_000_000


def stamp_ns(stamp) -> int:
    """A stamp as integer nanoseconds (exact; bags and alignment use these)."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def stamp_seconds(stamp) -> float:
    """A stamp as float seconds (ages and skews on the per-frame path)."""
    return stamp.sec + stamp.nanosec * 1e-9


def sec_nanosec(seconds: float) -> tuple[int, int]:
    """(sec, nanosec) of a time in seconds, rounded to the nanosecond."""
    ns = int(round(seconds * NS_PER_S))
    return ns // NS_PER_S, ns % NS_PER_S
