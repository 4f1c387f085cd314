"""The controlled testbed, its tiny models, and `srdata demo`."""
