# placeholder: replaced by the noise kernel
