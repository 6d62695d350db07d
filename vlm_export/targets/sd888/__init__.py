"""`--target sd888`: a Snapdragon 888 phone, QNN HTP context binaries and XNNPACK/CPU models
(profile.py: its recipes and options; target.py: the build)."""
