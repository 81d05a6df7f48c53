"""Backends run one attempt of an arm run somewhere: on this machine's Ray, or on a rented instance."""
