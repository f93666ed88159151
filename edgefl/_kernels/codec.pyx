# placeholder: replaced by the codec kernel
