# placeholder: replaced by the clip kernel
