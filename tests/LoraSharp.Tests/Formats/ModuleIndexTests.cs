using LoraSharp.Formats;

namespace LoraSharp.Tests.Formats;

public class ModuleIndexTests
{
    static ModuleIndex Index(params string[] paths)
        => ModuleIndex.FromShapes(paths.Select(p => new KeyValuePair<string, long[]>(p, [4, 4])));

    static string? ResolveKohya(ModuleIndex index, string name)
        => index.Resolve(AdapterKeyParser.Parse(name + ".lora_down.weight")!);

    [Fact]
    public void Kohya_names_resolve_through_the_models_own_paths_even_with_underscores_in_names()
    {
        var index = Index("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
                          "unet.down_blocks.0.attentions.0.proj_in",
                          "text_encoder.text_model.encoder.layers.0.self_attn.out_proj");
        Assert.Equal("unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
            ResolveKohya(index, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"));
        Assert.Equal("unet.down_blocks.0.attentions.0.proj_in", ResolveKohya(index, "lora_unet_down_blocks_0_attentions_0_proj_in"));
        Assert.Equal("text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
            ResolveKohya(index, "lora_te_text_model_encoder_layers_0_self_attn_out_proj"));
        Assert.Equal("text_encoder.text_model.encoder.layers.0.self_attn.out_proj",
            ResolveKohya(index, "lora_te1_text_model_encoder_layers_0_self_attn_out_proj"));
        Assert.Null(ResolveKohya(index, "lora_unet_down_blocks_0_attentions_0_proj_out"));
    }

    [Fact]
    public void Two_modules_with_one_mangled_name_are_ambiguous_and_resolve_to_neither()
    {
        var index = Index("unet.a_b.c", "unet.a.b_c");
        Assert.True(index.IsAmbiguous("lora_unet_a_b_c"));
        Assert.Null(ResolveKohya(index, "lora_unet_a_b_c"));
    }

    [Fact]
    public void Aliases_such_as_single_file_names_resolve_to_the_real_module()
    {
        var index = ModuleIndex.FromShapes([new("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", [4, 4])],
            [new("unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")]);
        Assert.Equal("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ResolveKohya(index, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"));
    }

    [Fact]
    public void Dotted_keys_resolve_by_exact_path_with_component()
    {
        var index = Index("unet.mid_block.attentions.0.proj_in", "model.layers.0.self_attn.q_proj");
        Assert.Equal("unet.mid_block.attentions.0.proj_in", index.Resolve(AdapterKeyParser.Parse("unet.mid_block.attentions.0.proj_in.lora_A.weight")!));
        Assert.Equal("model.layers.0.self_attn.q_proj", index.Resolve(AdapterKeyParser.Parse("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")!));
        Assert.Null(index.Resolve(AdapterKeyParser.Parse("base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight")!));
    }
}
