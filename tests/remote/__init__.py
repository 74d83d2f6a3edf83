"""The remote-replica protocol (embserve._remote): one contract, every transport."""
