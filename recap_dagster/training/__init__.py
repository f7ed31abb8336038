"""The training substrate every trainer shares (accelerator, seeding, LR schedules,
checkpoints under the storage root) and the device and precision choices. Plain Python."""
