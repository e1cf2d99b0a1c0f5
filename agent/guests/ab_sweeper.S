/*
 * A-B sweeper: the migration test guest, modelled on QEMU's a-b-bootblock
 * (tests/migration/i386/a-b-bootblock.S). A 512-byte boot sector loaded at 0x7c00:
 * enables A20 through port 0x92, loads a flat GDT, enters 32-bit protected mode,
 * prints 'A' on COM1 once, then forever increments the first byte of every 4 KiB
 * page from 1 MiB up to (not including) 100 MiB, printing 'B' every 256 sweeps.
 *
 * After any pause, each page's first byte equals its predecessor's, except at the one
 * page where the sweep was interrupted, which is one lower (mod 256). That is what
 * agent::guests::check_ab_ram verifies.
 */
        .set START_ADDR, 0x100000
        .set END_ADDR,   0x6400000
        .set COM1,       0x3f8

        .code16
        .text
        .globl _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x7c00, %sp

        /* Fast A20: set bit 1 of port 0x92, never bit 0 (that would reset). */
        inb     $0x92, %al
        or      $0x02, %al
        and     $0xfe, %al
        outb    %al, $0x92

        lgdtl   gdt_desc
        mov     %cr0, %eax
        or      $1, %eax
        mov     %eax, %cr0
        ljmpl   $0x08, $protected

        .code32
protected:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %fs
        mov     %eax, %gs
        mov     %eax, %ss
        mov     $0x7c00, %esp

        mov     $COM1, %dx
        mov     $'A', %al
        outb    %al, %dx

        xor     %ebx, %ebx              /* bl counts sweeps mod 256 */
sweep:
        mov     $START_ADDR, %ecx
page:
        incb    (%ecx)
        add     $0x1000, %ecx
        cmp     $END_ADDR, %ecx
        jl      page

        inc     %bl
        jnz     sweep
        mov     $'B', %al
        outb    %al, %dx
        jmp     sweep

        .p2align 3
gdt:
        .quad   0                       /* null */
        .quad   0x00cf9a000000ffff      /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff      /* 0x10: data, base 0, 4 GiB, 32-bit */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .org    510
        .byte   0x55, 0xaa
