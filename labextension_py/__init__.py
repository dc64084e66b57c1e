"""What runs inside a notebook kernel: the LabLink panels and the client they use."""
