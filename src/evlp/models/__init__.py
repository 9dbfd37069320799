"""Model building blocks: towers, teacher, shared block and the S-SMKE student."""
