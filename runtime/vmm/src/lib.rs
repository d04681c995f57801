//! husk-vmm: the virtual machine monitor behind every husk micro-VM (one process per VM).
