"""qmpmux: one QMP session to QEMU, shared by many clients that each believe they own it."""

__version__ = "0.1.0"
