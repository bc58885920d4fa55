"""`make bench`: xenblk against fio on the same image, and the cost of scale.

Run `python -m bench --help`; bench/README.md explains the cases and holds the latest table.
"""
