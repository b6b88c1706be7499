using LoraSharp.Formats;

namespace LoraSharp.Tests.Formats;

public class AdapterKeyParserTests
{
    [Theory]
    [InlineData("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", KeyFormat.Kohya, "lora_unet_", "lora_unet_down_blocks_0_attentions_0_proj_in", "lora_down")]
    [InlineData("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha", KeyFormat.Kohya, "lora_te_", "lora_te_text_model_encoder_layers_0_mlp_fc1", "alpha")]
    [InlineData("lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lokr_w2_a", KeyFormat.Kohya, "lora_te2_", "lora_te2_text_model_encoder_layers_1_self_attn_q_proj", "lokr_w2_a")]
    [InlineData("lora_unet_mid_block_resnets_0_conv1.hada_t1", KeyFormat.Kohya, "lora_unet_", "lora_unet_mid_block_resnets_0_conv1", "hada_t1")]
    [InlineData("lora_unet_x.dora_scale", KeyFormat.Kohya, "lora_unet_", "lora_unet_x", "dora_scale")]
    [InlineData("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", KeyFormat.Peft, "base_model.model.", "model.layers.0.self_attn.q_proj", "lora_down")]
    [InlineData("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", KeyFormat.Peft, "base_model.model.", "model.layers.0.self_attn.q_proj", "magnitude")]
    [InlineData("base_model.model.model.layers.1.self_attn.v_proj.hada_w2_b", KeyFormat.Peft, "base_model.model.", "model.layers.1.self_attn.v_proj", "hada_w2_b")]
    [InlineData("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", KeyFormat.DiffusersPeft, "unet.", "down_blocks.0.attentions.0.proj_in", "lora_up")]
    [InlineData("text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight", KeyFormat.DiffusersPeft, "text_encoder_2.", "text_model.encoder.layers.0.mlp.fc1", "lora_down")]
    [InlineData("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight", KeyFormat.DiffusersLegacy, "unet.", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "lora_down")]
    [InlineData("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight", KeyFormat.DiffusersLegacy, "unet.", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "lora_up")]
    [InlineData("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight", KeyFormat.DiffusersLegacy, "unet.", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "lora_down")]
    [InlineData("text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_linear_layer.up.weight", KeyFormat.DiffusersLegacy, "text_encoder.", "text_model.encoder.layers.3.self_attn.q_proj", "lora_up")]
    [InlineData("unet.down_blocks.1.attentions.0.proj_in.alpha", KeyFormat.DiffusersPeft, "unet.", "down_blocks.1.attentions.0.proj_in", "alpha")]
    public void Keys_of_every_layout_parse_to_module_and_role(string key, KeyFormat format, string component, string module, string role)
    {
        var parsed = AdapterKeyParser.Parse(key);
        Assert.NotNull(parsed);
        Assert.Equal(format, parsed.Format);
        Assert.Equal(component, parsed.Component);
        Assert.Equal(module, parsed.ModuleName);
        Assert.Equal(role, parsed.Role);
    }

    [Theory]
    [InlineData("lora_unet_down_blocks_0.lora_sideways.weight")]
    [InlineData("model.layers.0.self_attn.q_proj.weight")]
    [InlineData("lora_A.weight")]
    [InlineData("something_else")]
    public void Unknown_keys_do_not_parse(string key) => Assert.Null(AdapterKeyParser.Parse(key));

    [Fact]
    public void Pattern_groups_keys_by_replacing_digits()
        => Assert.Equal("lora_unet_down_blocks_N_attentions_N_proj_in.lora_down.weight",
            AdapterKeyParser.Pattern("lora_unet_down_blocks_12_attentions_0_proj_in.lora_down.weight"));
}
