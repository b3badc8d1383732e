"""A small registry built in the tests, so they do not depend on the example registry."""

from __future__ import annotations

from citypulse.registry import Registry, parse_registry

REGISTRY_YAML = """
version: 1
city: testville
sensors:
  - id: wtr-0001
    vendor: aquasense
    silo: water
    district: north
    asset: main-7
    location: {lat: 52.1, lon: 4.3}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 16}
      flow: {unit: m3/h, min: 0}
  - id: wtr-0002
    vendor: aquasense
    silo: water
    district: south
    asset: main-9
    location: {lat: 52.0, lon: 4.2}
    interval: 60s
    metrics:
      pressure: {unit: bar, min: 0, max: 16}
  - id: lgt-0001
    vendor: lumen
    silo: lighting
    district: north
    asset: pole-1
    location: {lat: 52.1, lon: 4.3}
    interval: 5m
    actuator: true
    metrics:
      dim_level: {unit: "%", min: 0, max: 100}
      lamp_on: {unit: "/"}
      energy: {unit: Wh, min: 0}
"""


def registry() -> Registry:
    return parse_registry(REGISTRY_YAML, "test-registry.yaml")
