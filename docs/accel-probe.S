.code16
.org 0
start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %sp
    # page tables at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD): zero 3 pages
    mov $0x1000, %di
    mov $0x1800, %cx
    xor %ax, %ax
    rep stosw
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x00000083, 0x3000      # 2 MiB page at 0, present|rw|ps
    lgdtl gdtr + 0x7c00
    mov %cr4, %eax
    or $0x20, %eax                # PAE
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx         # EFER
    rdmsr
    or $0x100, %eax               # LME
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax          # PG | PE
    mov %eax, %cr0
    ljmpl $0x08, $(long64 + 0x7c00)
.code64
long64:
    mov $0x10, %ax
    mov %ax, %ds
    mov $0x31, %al
    out %al, $0xf4
1:  hlt
    jmp 1b
.align 8
gdt:
    .quad 0
    .quad 0x00209A0000000000      # 64-bit code
    .quad 0x0000920000000000      # data
gdtr:
    .word gdtr - gdt - 1
    .long gdt + 0x7c00
.org 510
    .byte 0x55, 0xaa
