using LoraSharp.Diffusion;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.StableDiffusion;

namespace LoraSharp.Tests.Diffusion;

public class LbwTests
{
    [Fact]
    public void Layouts_list_the_extension_block_ids()
    {
        Assert.Equal(new[] { "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11" },
            LoraBlockWeight.Blocks17);
        Assert.Equal(new[] { "BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05" }, LoraBlockWeight.Blocks12);
        Assert.Equal(26, LoraBlockWeight.Blocks26.Count);
        Assert.Equal(20, LoraBlockWeight.Blocks20.Count);
        Assert.All(LoraBlockWeight.DefaultPresets.Values, v => Assert.Equal(17, LoraBlockWeight.Parse(v).Length));
    }

    [Fact]
    public void Presets_and_vectors_parse_and_expand_to_26_slots_with_zeros_for_unlisted_blocks()
    {
        var outd = LoraBlockWeight.Parse("OUTD");
        Assert.Equal(new double[] { 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0 }, outd);
        var w26 = LoraBlockWeight.To26(outd);
        string[] ones = ["BASE", "OUT03", "OUT04", "OUT05", "OUT06"];
        for (int i = 0; i < 26; i++)
            Assert.Equal(ones.Contains(LoraBlockWeight.Blocks26[i]) ? 1.0 : 0.0, w26[i]);
        var all = LoraBlockWeight.To26(LoraBlockWeight.Parse("ALL"));
        Assert.Equal(0.0, all[LoraBlockWeight.Blocks26.ToList().IndexOf("IN03")]); // downsampler block not in the 17 layout
        Assert.Equal(new double[] { 0.5, -1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0 }, LoraBlockWeight.Parse(" 0.5, -1 ,2,0,0,0,0,0,0,0,0,0"));
    }

    [Fact]
    public void Random_values_are_reproducible_with_a_seeded_generator_and_in_range()
    {
        var spec = "R,U,R,U,R,U,R,U,R,U,R,U,R,U,R,U,R";
        var a = LoraBlockWeight.Parse(spec, random: new Random(5));
        var b = LoraBlockWeight.Parse(spec, random: new Random(5));
        Assert.Equal(a, b);
        for (int i = 0; i < a.Length; i++)
        {
            if (i % 2 == 0) Assert.InRange(a[i], 0, 1);
            else Assert.InRange(a[i], -0.5, 1.5);
            Assert.Equal(Math.Round(a[i], 3), a[i]);
        }
    }

    [Theory]
    [InlineData("1,1")]
    [InlineData("NOSUCH")]
    [InlineData("1,1,1,1,1,1,1,1,1,1,1,x,1,1,1,1,1")]
    [InlineData("1,1,1,1,1,1,1,1,1,1,1,X+0.5,1,1,1,1,1")]
    public void Bad_specs_are_refused(string spec) => Assert.Throws<LoraSharpException>(() => LoraBlockWeight.Parse(spec));

    [Fact]
    public void Presets_file_adds_named_vectors_and_skips_comments_and_bad_lines()
    {
        using var tmp = new Infrastructure.TempDir();
        File.WriteAllLines(tmp.File("lbwpresets.txt"), ["XLOUT:1,0,0,0,0,0,1,1,1,1,1,1", "# COMMENT:1,1,1,1,1,1,1,1,1,1,1,1", "BAD:1,2", "MINE:0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"]);
        var presets = LoraBlockWeight.ReadPresets(tmp.File("lbwpresets.txt"));
        Assert.Equal(12, LoraBlockWeight.Parse("XLOUT", presets).Length);
        Assert.Equal(0, LoraBlockWeight.Parse("MINE", presets)[0]);
        Assert.False(presets.ContainsKey("BAD"));
        Assert.False(presets.ContainsKey("# COMMENT"));
        Assert.True(presets.ContainsKey("OUTD"));
    }

    [Theory]
    [InlineData("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "BASE")]
    [InlineData("unet.conv_in", "IN00")]
    [InlineData("unet.down_blocks.0.resnets.0.conv1", "IN01")]
    [InlineData("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "IN01")]
    [InlineData("unet.down_blocks.0.attentions.1.proj_in", "IN02")]
    [InlineData("unet.down_blocks.0.downsamplers.0.conv", "IN03")]
    [InlineData("unet.down_blocks.2.attentions.1.proj_out", "IN08")]
    [InlineData("unet.down_blocks.3.resnets.1.conv2", "IN11")]
    [InlineData("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "M00")]
    [InlineData("unet.mid_block.resnets.1.conv1", "M00")]
    [InlineData("unet.up_blocks.0.resnets.2.conv1", "OUT02")]
    [InlineData("unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "OUT03")]
    [InlineData("unet.up_blocks.3.attentions.2.proj_out", "OUT11")]
    [InlineData("unet.time_embedding.linear_1", null)]
    [InlineData("unet.conv_out", null)]
    public void Sd1_module_paths_map_to_ldm_blocks(string path, string? block)
    {
        var model = SdReference.Model("sd", "diffusers");
        Assert.Equal(block, LoraBlockWeight.BlockOf(path, LdmKeyMap.ForUNet(model.Config.Unet)));
    }

    [Theory]
    [InlineData("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", "BASE")]
    [InlineData("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v", "IN04")]
    [InlineData("unet.down_blocks.2.attentions.1.proj_in", "IN08")]
    [InlineData("unet.up_blocks.0.attentions.2.proj_out", "OUT02")]
    [InlineData("unet.up_blocks.1.attentions.0.proj_in", "OUT03")]
    [InlineData("unet.add_embedding.linear_1", null)]
    public void Sdxl_module_paths_map_to_sgm_blocks(string path, string? block)
    {
        var model = SdReference.Model("sdxl", "diffusers");
        Assert.Equal(block, LoraBlockWeight.BlockOf(path, LdmKeyMap.ForUNet(model.Config.Unet)));
    }

    [Fact]
    public void Module_weights_follow_the_vector_and_the_family_layout_is_checked()
    {
        var sd1 = SdReference.Model("sd", "diffusers");
        var w = LoraBlockWeight.ModuleWeights(sd1, LoraBlockWeight.Parse("0.3,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,2"));
        Assert.Equal(0.3, w("text_encoder.text_model.encoder.layers.1.mlp.fc2"));
        Assert.Equal(1.0, w("unet.down_blocks.0.attentions.0.proj_in"));
        Assert.Equal(2.0, w("unet.up_blocks.3.attentions.2.proj_out"));
        Assert.Equal(0.0, w("unet.down_blocks.0.downsamplers.0.conv"));
        Assert.Equal(1.0, w("unet.time_embedding.linear_2"));
        Assert.Throws<LoraSharpException>(() => LoraBlockWeight.ModuleWeights(sd1, LoraBlockWeight.Parse("1,1,1,1,1,1,1,1,1,1,1,1")));
        var sdxl = SdReference.Model("sdxl", "diffusers");
        Assert.Throws<LoraSharpException>(() => LoraBlockWeight.ModuleWeights(sdxl, LoraBlockWeight.Parse("ALL")));
        var wx = LoraBlockWeight.ModuleWeights(sdxl, LoraBlockWeight.Parse("0,1,0,0,0,0,0,0,0,0,0,0"));
        Assert.Equal(1.0, wx("unet.down_blocks.1.attentions.0.proj_in"));
        Assert.Equal(0.0, wx("unet.down_blocks.1.attentions.1.proj_in"));
    }
}
