# placeholder: replaced by the sgd kernel
