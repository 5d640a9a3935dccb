"""The city's calendar: every calendar day of the service is a day in the city's time zone.

A person turns 18, a record ages out and the daily refresh rolls over at midnight in the city
(Asia/Shanghai by default, ``qjscore serve --city-timezone``), whatever the host's zone is: a
server in UTC would otherwise keep yesterday's ages until 08:00 Beijing time.

    >>> import datetime as dt
    >>> zone = city_zone("Asia/Shanghai")
    >>> moment = dt.datetime(2026, 12, 6, 16, 30, tzinfo=dt.timezone.utc)  # 00:30 on the 7th in Hangzhou
    >>> EPOCH + dt.timedelta(days=day_in(zone, moment)), EPOCH + dt.timedelta(days=day_in(city_zone("UTC"), moment))
    (datetime.date(2026, 12, 7), datetime.date(2026, 12, 6))
    >>> city_zone("Mars/Olympus_Mons")
    Traceback (most recent call last):
    ...
    ValueError: city time zone 'Mars/Olympus_Mons': not an IANA time zone name (e.g. Asia/Shanghai)

The zone is set once at start (:func:`set_city_zone`, before the workers fork) and read by
:func:`today`; every day is an int, days since 1970-01-01, as in the store.
"""

from __future__ import annotations

import datetime as _dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_CITY_TIMEZONE = "Asia/Shanghai"
EPOCH = _dt.date(1970, 1, 1)


def city_zone(name: str) -> ZoneInfo:
    """The zone called ``name``; ValueError naming it if there is none (tzdata is a pinned
    dependency, so every IANA name resolves even where the host has no zoneinfo)."""
    try:
        if not name or name != name.strip():
            raise ValueError
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"city time zone {name!r}: not an IANA time zone name (e.g. {DEFAULT_CITY_TIMEZONE})") from None


_zone = city_zone(DEFAULT_CITY_TIMEZONE)


def set_city_zone(name: str) -> ZoneInfo:
    """Make ``name`` the city's zone for this process (and the workers it forks)."""
    global _zone
    _zone = city_zone(name)
    return _zone


def current_zone() -> ZoneInfo:
    return _zone


def day_in(zone: ZoneInfo, moment: _dt.datetime) -> int:
    """The calendar day (days since 1970-01-01) that ``moment`` falls on in ``zone``."""
    return (moment.astimezone(zone).date() - EPOCH).days


def today() -> int:
    """Today in the city: days since 1970-01-01, the unit of every date in the store."""
    return day_in(_zone, _dt.datetime.now(_dt.timezone.utc))
