"""A stand-in video framework: only its sequence-parallel rotary embedding."""
